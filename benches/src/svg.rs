//! What the SVG charts share (overlay-bench's chart, bench-report's bar charts).

/// Escapes text for SVG content and attribute values.
pub fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
