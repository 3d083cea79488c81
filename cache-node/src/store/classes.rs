//! The store's size classes, shown the way memcached shows its slab classes (`stats items`,
//! `stats slabs`, `stats sizes`, `stats cachedump`), so monitoring tools written for memcached
//! read a node unchanged.
//!
//! The mapping, honestly: classes 1 to 256 are the slab arena's classes, class `n` holding
//! allocations of `8n` bytes (an item's 20-byte header, key and value, rounded up to 8), in
//! 64 KiB pages. Items above 2 KiB come from the system allocator one by one; they are shown
//! as classes 257 and up, one per power-of-two band (257: up to 4 KiB, 258: up to 8 KiB, ...)
//! whose "page" is the item itself. Memcached has at most 63 classes growing by a factor of
//! 1.25; the node has more, finer ones, and shows only those holding memory, as memcached
//! shows only the classes it has used.
//!
//! Everything here is computed when asked, by walking each shard's items under its lock (one
//! shard at a time): no counter is kept on the get/set path for these rarely read figures.

use std::collections::BTreeMap;

use super::arena::{self, PAGE, SMALL_MAX, STEP};

/// Classes served by the slab arena: 1..=256.
pub const ARENA_CLASSES: u32 = (SMALL_MAX / STEP) as u32;
/// The highest class: the band of items up to 1 GiB (the largest item size limit).
pub const MAX_CLASS: u32 = ARENA_CLASSES + 19;

/// The class of an allocation of `alloc_len` bytes (header, key and value).
pub fn class_of(alloc_len: usize) -> u32 {
    if alloc_len <= SMALL_MAX {
        (arena::chunk_size(alloc_len) / STEP) as u32
    } else {
        // Band k holds (2048 << (k - 1), 2048 << k].
        let bits = usize::BITS - (alloc_len - 1).leading_zeros();
        (ARENA_CLASSES + bits - SMALL_MAX.trailing_zeros()).min(MAX_CLASS)
    }
}

/// The chunk size memcached would report for `class`: the arena chunk, or a band's upper bound.
pub fn chunk_size(class: u32) -> u64 {
    if class <= ARENA_CLASSES {
        u64::from(class) * STEP as u64
    } else {
        (SMALL_MAX as u64) << (class - ARENA_CLASSES)
    }
}

/// Chunks in one page of `class` (one for the bands: each large item is its own allocation).
pub fn chunks_per_page(class: u32) -> u64 {
    if class <= ARENA_CLASSES {
        (PAGE as u64) / chunk_size(class)
    } else {
        1
    }
}

/// What one class holds, summed over the shards.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassUsage {
    /// Live items.
    pub items: u64,
    /// Bytes the items asked for (header, key, value), before rounding to chunks.
    pub requested: u64,
    /// Pages given to the class (for a band: its items).
    pub pages: u64,
    /// Chunks never handed out at the end of the class's newest page in each shard.
    pub free_at_end: u64,
    /// Bytes the class holds from the allocator (pages, or the large items' real sizes).
    pub malloced: u64,
}

impl ClassUsage {
    pub fn total_chunks(&self, class: u32) -> u64 {
        if class <= ARENA_CLASSES {
            self.pages * chunks_per_page(class)
        } else {
            self.items
        }
    }
}

/// Adds one shard's items and arena pages to `out`.
pub(super) fn add_shard(shard: &super::Shard, now: u32, out: &mut BTreeMap<u32, ClassUsage>) {
    shard.for_each(|item| {
        if item.is_expired(now) {
            return;
        }
        let len = item.alloc_len();
        let class = class_of(len);
        let u = out.entry(class).or_default();
        u.items += 1;
        u.requested += len as u64;
        if class > ARENA_CLASSES {
            u.pages += 1;
            u.malloced += arena::chunk_size(len) as u64;
        }
    });
    for class in 1..=ARENA_CLASSES {
        let (pages, tail) = shard.arena().class_usage(chunk_size(class) as usize);
        if pages > 0 {
            let u = out.entry(class).or_default();
            u.pages += pages as u64;
            u.free_at_end += tail as u64;
            u.malloced += (pages * PAGE) as u64;
        }
    }
}

/// The bucket `stats sizes` counts an item in: its size rounded up to 32 bytes, as memcached
/// buckets its own item sizes.
pub fn size_bucket(alloc_len: usize) -> u64 {
    (alloc_len as u64).next_multiple_of(32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_follow_arena_chunks_then_power_of_two_bands() {
        assert_eq!(class_of(1), 1);
        assert_eq!(class_of(21), 3);
        assert_eq!(class_of(24), 3);
        assert_eq!(class_of(25), 4);
        assert_eq!(class_of(2048), 256);
        assert_eq!(class_of(2049), 257);
        assert_eq!(class_of(4096), 257);
        assert_eq!(class_of(4097), 258);
        assert_eq!(class_of(1 << 20), 265);
        assert_eq!(class_of(1 << 30), MAX_CLASS);
        assert_eq!(chunk_size(3), 24);
        assert_eq!(chunk_size(256), 2048);
        assert_eq!(chunk_size(257), 4096);
        assert_eq!(chunk_size(265), 1 << 20);
        assert_eq!(chunks_per_page(3), 65536 / 24);
        assert_eq!(chunks_per_page(260), 1);
        for len in [1, 8, 9, 2047, 2048, 2049, 5000, 1 << 20, (1 << 20) + 1] {
            assert!(
                chunk_size(class_of(len)) >= len as u64,
                "{len} fits its class"
            );
        }
    }
}
