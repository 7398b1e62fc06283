//! Label selectors as pure data: which pools select a node, and how specific
//! each selector is (most specific wins).

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Requirement {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A label selector; the empty selector matches every node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Selector {
    pub(crate) requirements: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown operator {0:?} in nodeSelector.matchExpressions; use In, NotIn, Exists or DoesNotExist")]
pub(crate) struct BadOperator(pub String);

impl Selector {
    pub(crate) fn from_parts(
        match_labels: &BTreeMap<String, String>,
        match_expressions: &[(String, String, Vec<String>)],
    ) -> Result<Self, BadOperator> {
        let mut requirements: Vec<Requirement> =
            match_labels.iter().map(|(k, v)| Requirement::In(k.clone(), vec![v.clone()])).collect();
        for (key, op, values) in match_expressions {
            requirements.push(match op.as_str() {
                "In" => Requirement::In(key.clone(), values.clone()),
                "NotIn" => Requirement::NotIn(key.clone(), values.clone()),
                "Exists" => Requirement::Exists(key.clone()),
                "DoesNotExist" => Requirement::DoesNotExist(key.clone()),
                other => return Err(BadOperator(other.to_string())),
            });
        }
        Ok(Selector { requirements })
    }

    pub(crate) fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }

    /// More requirements = more specific; the empty selector is the least specific.
    pub(crate) fn specificity(&self) -> usize {
        self.requirements.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn empty_selector_matches_everything() {
        assert!(Selector::default().matches(&labels(&[])));
        assert_eq!(Selector::default().specificity(), 0);
    }

    #[test]
    fn labels_and_expressions() {
        let s = Selector::from_parts(
            &labels(&[("pool", "gpu")]),
            &[
                ("zone".into(), "In".into(), vec!["a".into(), "b".into()]),
                ("spot".into(), "DoesNotExist".into(), vec![]),
            ],
        )
        .unwrap();
        assert!(s.matches(&labels(&[("pool", "gpu"), ("zone", "a")])));
        assert!(!s.matches(&labels(&[("pool", "gpu"), ("zone", "c")])));
        assert!(!s.matches(&labels(&[("pool", "gpu"), ("zone", "a"), ("spot", "1")])));
        assert_eq!(s.specificity(), 3);
        assert!(Selector::from_parts(&labels(&[]), &[("k".into(), "Gt".into(), vec![])]).is_err());
    }
}
