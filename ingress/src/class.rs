//! Which Ingresses this controller serves, as ingress-nginx decides with `--controller-class`,
//! `--ingress-class` and `--watch-ingress-without-class`:
//!
//! - `spec.ingressClassName` names an IngressClass whose `spec.controller` is ours;
//! - no class field but the legacy `kubernetes.io/ingress.class` annotation equal to our class
//!   name;
//! - neither: the cluster's default IngressClass (annotation
//!   `ingressclass.kubernetes.io/is-default-class: "true"`) is ours, or `watch_without_class`.
//!   Kubernetes' admission writes the default class into new Ingresses; without an API server
//!   the controller applies it when it reads them. With several default classes (the API
//!   server then refuses class-less Ingresses), the first by name counts, so that exactly one
//!   controller serves them.

use std::collections::BTreeSet;

use registry::{Ingress, IngressClass, LEGACY_CLASS_ANNOTATION};

/// The controller's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassConfig {
    /// Our `spec.controller` value.
    pub controller: String,
    /// The class name the legacy annotation must carry.
    pub class_name: String,
    /// Serve Ingresses without any class even when the default class is not ours.
    pub watch_without_class: bool,
}

impl Default for ClassConfig {
    fn default() -> Self {
        ClassConfig {
            controller: "flannel.io/ingress".to_string(),
            class_name: "flannel".to_string(),
            watch_without_class: false,
        }
    }
}

/// The decision for every Ingress, from the IngressClasses of the moment.
#[derive(Debug, Clone)]
pub struct ClassFilter {
    cfg: ClassConfig,
    ours: BTreeSet<String>,
    default_is_ours: bool,
}

impl ClassFilter {
    pub fn new<'a>(cfg: ClassConfig, classes: impl IntoIterator<Item = &'a IngressClass>) -> Self {
        let mut ours = BTreeSet::new();
        let mut default: Option<(&str, bool)> = None;
        for c in classes {
            let mine = c.spec.controller == cfg.controller;
            if mine {
                ours.insert(c.metadata.name.clone());
            }
            if c.is_default() && default.is_none_or(|(name, _)| c.metadata.name.as_str() < name) {
                default = Some((c.metadata.name.as_str(), mine));
            }
        }
        ClassFilter {
            default_is_ours: default.is_some_and(|(_, mine)| mine),
            cfg,
            ours,
        }
    }

    /// Whether this controller serves `ing`.
    pub fn serves(&self, ing: &Ingress) -> bool {
        if let Some(name) = &ing.spec.ingress_class_name {
            return self.ours.contains(name);
        }
        match ing.metadata.annotations.get(LEGACY_CLASS_ANNOTATION) {
            Some(v) => *v == self.cfg.class_name,
            None => self.default_is_ours || self.cfg.watch_without_class,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use registry::DEFAULT_CLASS_ANNOTATION;

    fn class(name: &str, controller: &str, default: bool) -> IngressClass {
        let mut c = IngressClass::default();
        c.metadata.name = name.into();
        c.spec.controller = controller.into();
        if default {
            c.metadata
                .annotations
                .insert(DEFAULT_CLASS_ANNOTATION.into(), "true".into());
        }
        c
    }

    fn ing(class: Option<&str>, annotation: Option<&str>) -> Ingress {
        let mut i = Ingress::default();
        i.spec.ingress_class_name = class.map(str::to_string);
        if let Some(a) = annotation {
            i.metadata
                .annotations
                .insert(LEGACY_CLASS_ANNOTATION.into(), a.into());
        }
        i
    }

    #[test]
    fn class_field_annotation_and_default() {
        let ours = "flannel.io/ingress";
        let classes = [
            class("flannel", ours, false),
            class("nginx", "k8s.io/ingress-nginx", true),
        ];
        let f = ClassFilter::new(ClassConfig::default(), &classes);
        assert!(f.serves(&ing(Some("flannel"), None)));
        assert!(!f.serves(&ing(Some("nginx"), None)));
        assert!(!f.serves(&ing(Some("missing"), None)));
        assert!(f.serves(&ing(None, Some("flannel"))));
        assert!(!f.serves(&ing(None, Some("nginx"))));
        // The default class is nginx's: class-less Ingresses are not ours...
        assert!(!f.serves(&ing(None, None)));
        // ...unless asked to watch them.
        let cfg = ClassConfig {
            watch_without_class: true,
            ..ClassConfig::default()
        };
        assert!(ClassFilter::new(cfg, &classes).serves(&ing(None, None)));
        // Our class as the default.
        let classes = [
            class("flannel", ours, true),
            class("nginx", "k8s.io/ingress-nginx", false),
        ];
        assert!(ClassFilter::new(ClassConfig::default(), &classes).serves(&ing(None, None)));
        // Two defaults: the first by name decides, whatever the order given.
        let a = [
            class("b-nginx", "k8s.io/ingress-nginx", true),
            class("a-flannel", ours, true),
        ];
        assert!(ClassFilter::new(ClassConfig::default(), &a).serves(&ing(None, None)));
        let b = [
            class("a-nginx", "k8s.io/ingress-nginx", true),
            class("b-flannel", ours, true),
        ];
        assert!(!ClassFilter::new(ClassConfig::default(), &b).serves(&ing(None, None)));
        // No class at all in the cluster.
        assert!(!ClassFilter::new(ClassConfig::default(), &[]).serves(&ing(None, None)));
    }
}
