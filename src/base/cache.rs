//! A least-recently-used cache bounded in bytes, shared by every image of a backing chain so
//! that the memory bound holds for the whole chain (the images of a chain may have different
//! cluster sizes, so a bound on the number of entries would not do).

use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use lru::LruCache;

/// Tables or clusters, each an `Arc<[T]>`, by key, within `budget` bytes: the least recently
/// used are dropped to make room. The most recently used entry always stays, however large.
pub(crate) struct ByteLru<K: Hash + Eq, T, S = BuildHasherDefault<KeyHasher>> {
    entries: LruCache<K, Arc<[T]>, S>,
    bytes: u64,
    budget: u64,
}

impl<K: Hash + Eq, T, S: BuildHasher + Default> ByteLru<K, T, S> {
    /// An empty cache holding at most `budget` bytes.
    pub(crate) fn new(budget: u64) -> Self {
        ByteLru {
            entries: LruCache::unbounded_with_hasher(S::default()),
            bytes: 0,
            budget,
        }
    }

    /// The entry for `key`, now the most recently used. The most recently used entry is
    /// found without hashing or reordering: sequential reads ask for it again and again.
    pub(crate) fn get(&mut self, key: &K) -> Option<&Arc<[T]>> {
        if self.entries.peek_mru().is_some_and(|(k, _)| k == key) {
            return self.entries.peek_mru().map(|(_, v)| v);
        }
        self.entries.get(key)
    }

    /// Whether `key` is cached, without changing the order.
    pub(crate) fn contains(&self, key: &K) -> bool {
        self.entries.contains(key)
    }

    /// Insert `value` as the most recently used, dropping the least recently used entries
    /// while over budget.
    pub(crate) fn put(&mut self, key: K, value: Arc<[T]>) {
        self.put_and_evict(key, value, drop);
    }

    /// [`put`](Self::put), handing each entry it drops (or replaces) to `evicted`, which may
    /// keep its buffer for reuse.
    pub(crate) fn put_and_evict(
        &mut self,
        key: K,
        value: Arc<[T]>,
        mut evicted: impl FnMut(Arc<[T]>),
    ) {
        let size = entry_bytes(&value);
        if let Some(old) = self.entries.put(key, value) {
            self.bytes = self.bytes.saturating_sub(entry_bytes(&old));
            evicted(old);
        }
        self.bytes = self.bytes.saturating_add(size);
        while self.bytes > self.budget && self.entries.len() > 1 {
            let Some((_, dropped)) = self.entries.pop_lru() else {
                break;
            };
            self.bytes = self.bytes.saturating_sub(entry_bytes(&dropped));
            evicted(dropped);
        }
    }

    /// Bytes held.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }
}

fn entry_bytes<T>(value: &Arc<[T]>) -> u64 {
    (std::mem::size_of_val::<[T]>(value) as u64).max(1)
}

/// A new id for an image, so that images sharing caches keep their entries apart.
pub(crate) fn new_image_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Fibonacci hashing of the `u64` words of a key. The keys are image ids and cluster-aligned
/// offsets chosen by the image: this spreads them well and costs a fraction of SipHash on
/// every read.
#[derive(Default)]
pub(crate) struct KeyHasher(u64);

impl Hasher for KeyHasher {
    /// The product's high half folded into its low half: the hash table picks buckets by the
    /// low bits, and those of a product depend only on the low bits of the keys, which are
    /// all zero for aligned offsets (every key would land in one probe sequence).
    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 32)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_offsets_hash_to_different_low_bits() {
        let low_bits = |offset: u64| {
            let mut h = KeyHasher::default();
            (7u64, offset).hash(&mut h);
            h.finish() & 0xfff
        };
        let distinct: std::collections::HashSet<u64> =
            (0..256u64).map(|i| low_bits(i << 16)).collect();
        assert!(distinct.len() > 200, "{} distinct of 256", distinct.len());
    }

    #[test]
    fn stays_within_its_budget_in_bytes() {
        let mut c: ByteLru<(u64, u64), u64> = ByteLru::new(1000);
        for i in 0..10 {
            c.put((0, i), Arc::from(vec![0u64; 50])); // 400 bytes each
        }
        assert_eq!(c.bytes(), 800);
        assert!(c.contains(&(0, 9)) && c.contains(&(0, 8)) && !c.contains(&(0, 7)));
        assert!(c.get(&(0, 8)).is_some());
        c.put((1, 0), Arc::from(vec![0u64; 50]));
        assert!(
            c.contains(&(0, 8)) && !c.contains(&(0, 9)),
            "least recent dropped"
        );
        // One entry over the budget on its own still stays: it is being used.
        c.put((2, 0), Arc::from(vec![0u64; 500]));
        assert!(c.contains(&(2, 0)));
        assert_eq!(c.bytes(), 4000);
    }
}
