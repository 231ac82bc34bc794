//! References counted for one window of host clusters, as wide as the image's refcounts (like
//! QEMU's in-memory refcount table), so a window holds as many clusters as the memory budget
//! allows.

use std::ops::Range;

/// One counter per host cluster of a window.
pub(crate) enum Counters {
    U8(Vec<u8>),
    U16(Vec<u16>),
    U32(Vec<u32>),
    U64(Vec<u64>),
}

/// What [`Counters::increment`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Increment {
    /// Counted.
    Done,
    /// The counter is at the refcount maximum already (QEMU: "overflow cluster").
    Overflow,
}

impl Counters {
    /// Bytes per counter for refcounts of `1 << order` bits.
    pub fn width(order: u32) -> u64 {
        match order {
            0..=3 => 1,
            4 => 2,
            5 => 4,
            _ => 8,
        }
    }

    /// Zeroed counters for `len` clusters.
    pub fn new(order: u32, len: usize) -> Self {
        match Self::width(order) {
            1 => Counters::U8(vec![0; len]),
            2 => Counters::U16(vec![0; len]),
            4 => Counters::U32(vec![0; len]),
            _ => Counters::U64(vec![0; len]),
        }
    }

    /// Reset every counter to 0, for the next window.
    pub fn clear(&mut self) {
        match self {
            Counters::U8(v) => v.fill(0),
            Counters::U16(v) => v.fill(0),
            Counters::U32(v) => v.fill(0),
            Counters::U64(v) => v.fill(0),
        }
    }

    /// The count at `index` (0 outside the window).
    pub fn get(&self, index: usize) -> u64 {
        match self {
            Counters::U8(v) => v.get(index).map_or(0, |&c| u64::from(c)),
            Counters::U16(v) => v.get(index).map_or(0, |&c| u64::from(c)),
            Counters::U32(v) => v.get(index).map_or(0, |&c| u64::from(c)),
            Counters::U64(v) => v.get(index).copied().unwrap_or(0),
        }
    }

    /// Add one reference at `index`, unless the count is `max` already.
    pub fn increment(&mut self, index: usize, max: u64) -> Increment {
        let now = self.get(index);
        if now >= max {
            return Increment::Overflow;
        }
        let next = now.saturating_add(1);
        match self {
            Counters::U8(v) => set(v, index, next),
            Counters::U16(v) => set(v, index, next),
            Counters::U32(v) => set(v, index, next),
            Counters::U64(v) => set(v, index, next),
        }
        Increment::Done
    }
}

fn set<T: TryFrom<u64>>(v: &mut [T], index: usize, value: u64) {
    if let (Some(slot), Ok(value)) = (v.get_mut(index), T::try_from(value)) {
        *slot = value;
    }
}

/// The windows of host clusters `0..clusters`, `len` clusters each, last window first (the
/// last one holds the cluster a reference may add past the end of the file, which the checks
/// of refcount blocks need to know about before the other windows run).
pub(crate) fn windows(clusters: u64, len: u64) -> impl Iterator<Item = Range<u64>> {
    let len = len.max(1);
    let count = clusters.div_ceil(len);
    (0..count).rev().map(move |i| {
        let start = i.saturating_mul(len);
        start..start.saturating_add(len).min(clusters)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_saturate_at_the_refcount_maximum() {
        let mut c = Counters::new(0, 4); // 1-bit refcounts: max 1
        assert_eq!(c.increment(2, 1), Increment::Done);
        assert_eq!(c.increment(2, 1), Increment::Overflow);
        assert_eq!(c.get(2), 1);
        let mut c = Counters::new(4, 4);
        for _ in 0..3 {
            c.increment(1, 0xffff);
        }
        assert_eq!(c.get(1), 3);
        assert_eq!(c.get(99), 0);
        c.clear();
        assert_eq!(c.get(1), 0);
        let mut c = Counters::new(6, 1);
        assert_eq!(c.increment(0, u64::MAX), Increment::Done);
    }

    #[test]
    fn windows_cover_every_cluster_last_first() {
        let w: Vec<_> = windows(10, 4).collect();
        assert_eq!(w, vec![8..10, 4..8, 0..4]);
        assert_eq!(windows(3, 100).collect::<Vec<_>>(), vec![0..3]);
        assert_eq!(windows(0, 4).count(), 0);
    }
}
