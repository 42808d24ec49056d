//! A small least-recently-used map: the host's loaded programs are bounded with it, so a
//! tenant running ever new programs cannot grow the server's memory without end.
//!
//! Eviction scans for the oldest entry (O(n)): the maps it bounds hold tens to hundreds
//! of entries and eviction happens only when a new program is loaded, which costs far more.

use std::collections::HashMap;
use std::hash::Hash;

pub(crate) struct Lru<K, V> {
    entries: HashMap<K, (V, u64)>,
    capacity: usize,
    tick: u64,
}

impl<K: Hash + Eq + Clone, V: Clone> Lru<K, V> {
    /// A map keeping at most `capacity` entries (at least one).
    pub(crate) fn new(capacity: usize) -> Self {
        Lru { entries: HashMap::new(), capacity: capacity.max(1), tick: 0 }
    }

    /// The value under `key`, now the most recently used.
    pub(crate) fn get(&mut self, key: &K) -> Option<V> {
        self.tick += 1;
        let tick = self.tick;
        self.entries.get_mut(key).map(|(value, used)| {
            *used = tick;
            value.clone()
        })
    }

    /// Adds (or replaces) `key`, dropping the least recently used entries past capacity.
    pub(crate) fn insert(&mut self, key: K, value: V) {
        self.tick += 1;
        self.entries.insert(key.clone(), (value, self.tick));
        while self.entries.len() > self.capacity {
            let oldest = self.entries.iter().min_by_key(|(_, (_, used))| *used).map(|(k, _)| k.clone());
            match oldest {
                Some(k) => self.entries.remove(&k),
                None => break,
            };
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::Lru;

    #[test]
    fn keeps_the_most_recently_used() {
        let mut lru = Lru::new(2);
        lru.insert("a", 1);
        lru.insert("b", 2);
        assert_eq!(lru.get(&"a"), Some(1)); // `b` is now the oldest
        lru.insert("c", 3);
        assert_eq!((lru.len(), lru.get(&"b"), lru.get(&"a"), lru.get(&"c")), (2, None, Some(1), Some(3)));
        lru.insert("c", 4);
        assert_eq!((lru.len(), lru.get(&"c")), (2, Some(4)));
        let mut one = Lru::new(0);
        one.insert(1, ());
        one.insert(2, ());
        assert_eq!((one.len(), one.get(&2)), (1, Some(())));
    }
}
