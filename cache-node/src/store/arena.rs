//! Per-shard slab arena for small item allocations.
//!
//! Why not the global allocator: glibc spends an 8-byte header per chunk and rounds chunks to
//! 16 bytes, about 12 bytes per item on average, and mimalloc measured worse still
//! (docs/architecture.md). Items up to `SMALL_MAX` bytes are carved here from 64 KiB pages in
//! size classes of 8-byte steps, with no per-chunk header; freed chunks go on an intrusive
//! free list of their class. The arena lives inside its shard, under the shard's lock, so it
//! needs no synchronisation of its own. Larger items (images) go to the global allocator,
//! where a few bytes of rounding do not matter.
//!
//! The price is memcached's: a page given to one size class stays with it until the shard is
//! cleared. The capacity accounting charges items by chunk size, so this only shows as RSS
//! above `bytes` after the item-size mix of a workload shifts.

use std::alloc::{Layout, alloc, dealloc};
use std::ptr::{self, NonNull};

/// Largest allocation served from the arena.
pub const SMALL_MAX: usize = 2048;
/// Class granularity.
pub const STEP: usize = 8;
const CLASSES: usize = SMALL_MAX / STEP + 1;
pub const PAGE: usize = 64 * 1024;
const PAGE_LAYOUT: Layout = match Layout::from_size_align(PAGE, 16) {
    Ok(l) => l,
    Err(_) => panic!("page layout"),
};

#[derive(Clone, Copy)]
struct Class {
    /// Head of the free list; each free chunk stores the next pointer in its first 8 bytes.
    free: *mut u8,
    /// Unused tail of the class's newest page.
    bump: *mut u8,
    end: *mut u8,
}

const EMPTY: Class = Class {
    free: ptr::null_mut(),
    bump: ptr::null_mut(),
    end: ptr::null_mut(),
};

/// A slab arena. Must be `reset` (or dropped) only when no allocation from it is in use.
pub struct Arena {
    classes: Box<[Class; CLASSES]>,
    pages: Vec<NonNull<u8>>,
    /// Pages given to each class (`stats slabs`).
    class_pages: Box<[u32; CLASSES]>,
}

// SAFETY: the arena owns its pages exclusively; it is only used behind its shard's mutex.
unsafe impl Send for Arena {}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena")
            .field("pages", &self.pages.len())
            .finish()
    }
}

impl Default for Arena {
    fn default() -> Self {
        Arena {
            classes: Box::new([EMPTY; CLASSES]),
            pages: Vec::new(),
            class_pages: Box::new([0; CLASSES]),
        }
    }
}

/// The size an allocation of `size` bytes really takes (its chunk or, for large ones, the
/// request rounded to the allocator's 16 bytes plus its 8-byte header).
pub fn chunk_size(size: usize) -> usize {
    if size <= SMALL_MAX {
        size.max(STEP).next_multiple_of(STEP)
    } else {
        (size + 8).next_multiple_of(16)
    }
}

fn large_layout(size: usize) -> Layout {
    // Sizes are bounded by the maximum item size (1 GiB at most), far below isize::MAX.
    Layout::from_size_align(size, 8).unwrap_or(Layout::new::<u64>())
}

impl Arena {
    /// Allocates `size` bytes (8-byte aligned).
    pub fn alloc(&mut self, size: usize) -> NonNull<u8> {
        if size > SMALL_MAX {
            let layout = large_layout(size);
            // SAFETY: non-zero size.
            let raw = unsafe { alloc(layout) };
            return NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        }
        let chunk = chunk_size(size);
        let class = &mut self.classes[chunk / STEP];
        if !class.free.is_null() {
            let p = class.free;
            // SAFETY: `p` is a free chunk of this class holding the next free pointer.
            class.free = unsafe { p.cast::<*mut u8>().read() };
            // SAFETY: non-null checked above.
            return unsafe { NonNull::new_unchecked(p) };
        }
        if class.bump.is_null() || (class.end as usize - class.bump as usize) < chunk {
            // SAFETY: PAGE_LAYOUT has non-zero size.
            let raw = unsafe { alloc(PAGE_LAYOUT) };
            let page =
                NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(PAGE_LAYOUT));
            self.pages.push(page);
            self.class_pages[chunk / STEP] += 1;
            let class = &mut self.classes[chunk / STEP];
            class.bump = page.as_ptr();
            // SAFETY: one past the end of the page allocation.
            class.end = unsafe { page.as_ptr().add(PAGE) };
        }
        let class = &mut self.classes[chunk / STEP];
        let p = class.bump;
        // SAFETY: at least `chunk` bytes remain before `end` (checked above).
        class.bump = unsafe { p.add(chunk) };
        // SAFETY: `p` lies inside a live page.
        unsafe { NonNull::new_unchecked(p) }
    }

    /// Returns an allocation of `size` bytes.
    ///
    /// # Safety
    /// `ptr` must come from `alloc(size)` on this arena, not be freed already, and not be used
    /// afterwards.
    pub unsafe fn free(&mut self, ptr: NonNull<u8>, size: usize) {
        if size > SMALL_MAX {
            // SAFETY: allocated by the global allocator with this layout (caller's contract).
            unsafe { dealloc(ptr.as_ptr(), large_layout(size)) };
            return;
        }
        let class = &mut self.classes[chunk_size(size) / STEP];
        // SAFETY: the chunk is at least 8 bytes, 8-aligned, and ours to reuse.
        unsafe { ptr.as_ptr().cast::<*mut u8>().write(class.free) };
        class.free = ptr.as_ptr();
    }

    /// Frees every page at once. Large allocations must have been freed by the caller.
    ///
    /// # Safety
    /// No small allocation from this arena may be used afterwards.
    pub unsafe fn reset(&mut self) {
        for page in self.pages.drain(..) {
            // SAFETY: every page was allocated with PAGE_LAYOUT and is freed once.
            unsafe { dealloc(page.as_ptr(), PAGE_LAYOUT) };
        }
        *self.classes = [EMPTY; CLASSES];
        *self.class_pages = [0; CLASSES];
    }

    /// Pages held by the class of `chunk`-byte chunks, and the chunks never handed out at the
    /// end of its newest page.
    pub fn class_usage(&self, chunk: usize) -> (usize, usize) {
        let (Some(&pages), Some(class)) = (
            self.class_pages.get(chunk / STEP),
            self.classes.get(chunk / STEP),
        ) else {
            return (0, 0);
        };
        let tail = if class.bump.is_null() {
            0
        } else {
            (class.end as usize - class.bump as usize) / chunk.max(STEP)
        };
        (pages as usize, tail)
    }

    /// Bytes held in pages (for tests and stats).
    pub fn page_bytes(&self) -> usize {
        self.pages.len() * PAGE
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: the owner drops its items' memory with the arena (Shard::drop clears first).
        unsafe { self.reset() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_distinct_reused_and_sized_in_steps_of_eight() {
        let mut a = Arena::default();
        let sizes = [1, 8, 9, 152, 2048, 2049, 100_000];
        let ptrs: Vec<_> = sizes.iter().map(|&s| (a.alloc(s), s)).collect();
        for (p, s) in &ptrs {
            // Write the whole allocation: overlaps would corrupt a neighbour, which the
            // check below (and Miri / ASan in the fuzz target) would catch.
            unsafe { ptr::write_bytes(p.as_ptr(), *s as u8, *s) };
        }
        for (p, s) in &ptrs {
            let bytes = unsafe { std::slice::from_raw_parts(p.as_ptr(), *s) };
            assert!(bytes.iter().all(|&b| b == *s as u8), "size {s} overwritten");
        }
        let (p152, _) = ptrs[3];
        unsafe { a.free(p152, 152) };
        assert_eq!(a.alloc(150), p152, "a freed chunk is reused by its class");
        assert_eq!(chunk_size(152), 152);
        assert_eq!(chunk_size(153), 160);
        assert_eq!(chunk_size(4000), 4016);
        for (p, s) in ptrs.into_iter().skip(4) {
            if s > SMALL_MAX {
                unsafe { a.free(p, s) };
            }
        }
        assert!(a.page_bytes() >= PAGE);
    }

    #[test]
    fn one_page_serves_many_chunks_of_a_class() {
        let mut a = Arena::default();
        for _ in 0..PAGE / 152 {
            a.alloc(152);
        }
        assert_eq!(a.page_bytes(), PAGE);
        a.alloc(152);
        assert_eq!(a.page_bytes(), 2 * PAGE);
    }
}
