//! The map from event to a sale's slot that a reload of the file rebuilds.

use std::collections::HashMap;

use crate::config::SaleConfig;

/// The map of `sales` by event after a reload: a sale `old` has keeps its
/// slot (the same value, cloned: with an `Arc` the same state), one it has
/// not gets `make(sale)`; the events of those made come back too, in the
/// file's order. Why it exists: the node's states ([`super::Sales`]) and
/// its stores ([`super::store::Stores`]) each keep one such map, and a kept
/// sale must keep its state in both the same way.
pub fn keep_or_make<T: Clone>(
    old: &HashMap<String, T>,
    sales: &[SaleConfig],
    mut make: impl FnMut(&SaleConfig) -> T,
) -> (HashMap<String, T>, Vec<String>) {
    let mut added = Vec::new();
    let next = sales
        .iter()
        .map(|s| {
            let slot = match old.get(&s.event) {
                Some(kept) => kept.clone(),
                None => {
                    added.push(s.event.clone());
                    make(s)
                }
            };
            (s.event.clone(), slot)
        })
        .collect();
    (next, added)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn sale(event: &str) -> SaleConfig {
        SaleConfig::new(event.to_string(), 10, 1)
    }

    #[test]
    fn kept_slots_are_the_same_added_listed_in_order_removed_gone() {
        let kept = Arc::new("kept".to_string());
        let old: HashMap<String, Arc<String>> = [
            ("b".to_string(), kept.clone()),
            ("gone".to_string(), Arc::new("gone".to_string())),
        ]
        .into_iter()
        .collect();
        let sales = [sale("z"), sale("b"), sale("a")];
        let (next, added) = keep_or_make(&old, &sales, |s| Arc::new(format!("new {}", s.event)));
        assert!(Arc::ptr_eq(&next["b"], &kept), "a kept sale keeps its slot");
        assert_eq!(added, ["z", "a"], "the added sales, in the file's order");
        assert_eq!(*next["z"], "new z");
        assert_eq!(*next["a"], "new a");
        assert!(!next.contains_key("gone"), "a removed sale is absent");
        assert_eq!(next.len(), 3);
    }
}
