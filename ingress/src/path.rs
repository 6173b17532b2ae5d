//! Request paths as the router compares them, normalized as nginx does before it matches a
//! `location` (ingress-nginx routes on nginx's normalized URI): percent-escapes decoded, `.` and
//! `..` segments resolved, runs of `/` merged. Without this a request for `/admin/../api` or
//! `/%61pi` could reach a different route than the one its normalized path names. The request
//! goes to the backend unchanged; only the routing decision uses the normalized form.

/// Why a request path cannot be routed (the proxy answers 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path must start with '/'")]
    NotAbsolute,
    #[error("invalid percent-escape in the path")]
    BadEscape,
    #[error("the path decodes to bytes that are not UTF-8")]
    NotUtf8,
    #[error("the path climbs above the root ('..')")]
    AboveRoot,
    #[error("the path holds a NUL byte")]
    Nul,
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The routing form of a request target's path (the query, from `?`, is not part of it).
pub fn normalize_path(target: &str) -> Result<String, PathError> {
    let raw = target.split(['?', '#']).next().unwrap_or("");
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let bytes = raw.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hi = bytes.get(i + 1).copied().and_then(hex);
            let lo = bytes.get(i + 2).copied().and_then(hex);
            match (hi, lo) {
                (Some(h), Some(l)) => decoded.push(h << 4 | l),
                _ => return Err(PathError::BadEscape),
            }
            i += 3;
        } else {
            decoded.push(bytes[i]);
            i += 1;
        }
    }
    if decoded.contains(&0) {
        return Err(PathError::Nul);
    }
    let decoded = String::from_utf8(decoded).map_err(|_| PathError::NotUtf8)?;
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                if out.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
            }
            s => out.push(s),
        }
    }
    let mut path = String::with_capacity(decoded.len());
    for s in &out {
        path.push('/');
        path.push_str(s);
    }
    if path.is_empty() || trailing {
        path.push('/');
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_as_nginx_before_matching() {
        for (raw, want) in [
            ("/", "/"),
            ("/api", "/api"),
            ("/api/", "/api/"),
            ("//api///v1", "/api/v1"),
            ("/a/./b", "/a/b"),
            ("/a/b/..", "/a/"),
            ("/admin/../api?x=/admin", "/api"),
            ("/%61pi", "/api"),
            ("/a%2fb", "/a/b"),
            ("/caf%C3%A9", "/café"),
            ("/x#frag", "/x"),
        ] {
            assert_eq!(normalize_path(raw).as_deref(), Ok(want), "{raw}");
        }
        assert_eq!(normalize_path("api"), Err(PathError::NotAbsolute));
        assert_eq!(normalize_path("*"), Err(PathError::NotAbsolute));
        assert_eq!(normalize_path("/%zz"), Err(PathError::BadEscape));
        assert_eq!(normalize_path("/%4"), Err(PathError::BadEscape));
        assert_eq!(normalize_path("/../etc"), Err(PathError::AboveRoot));
        assert_eq!(normalize_path("/%2e%2e/etc"), Err(PathError::AboveRoot));
        assert_eq!(normalize_path("/%ff"), Err(PathError::NotUtf8));
        assert_eq!(normalize_path("/a%00"), Err(PathError::Nul));
    }

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        let alphabet = ["/", "%", "2", "f", ".", "..", "a", "?", "%2", "é", "\u{0}"];
        // Every string of up to 4 tokens from the alphabet.
        let mut stack = vec![(String::new(), 0)];
        while let Some((s, depth)) = stack.pop() {
            let _ = normalize_path(&s);
            let _ = normalize_path(&format!("/{s}"));
            if depth < 4 {
                for t in alphabet {
                    stack.push((format!("{s}{t}"), depth + 1));
                }
            }
        }
    }
}
