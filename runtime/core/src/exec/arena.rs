//! The session's one block of memory and disjoint views into it for each op.

use alloc::vec::Vec;
use core::ops::Range;

/// Owned by the session, or lent by the caller (firmware with a static buffer).
pub enum Arena<'a> {
    Owned(Vec<f32>),
    Borrowed(&'a mut [f32]),
}

impl Arena<'_> {
    pub fn floats(&self) -> &[f32] {
        match self {
            Arena::Owned(v) => v,
            Arena::Borrowed(s) => s,
        }
    }

    pub fn floats_mut(&mut self) -> &mut [f32] {
        match self {
            Arena::Owned(v) => v,
            Arena::Borrowed(s) => s,
        }
    }
}

/// Mutable views of `ranges` of `arena`, in the order given. The planner gives every buffer an
/// op touches its own floats while that op runs, and the artifact reader refuses ops that name
/// one buffer twice, so the ranges never overlap; should they, the overlapping views come back
/// empty rather than aliased.
pub fn split<'s, const N: usize>(
    arena: &'s mut [f32],
    ranges: [Range<usize>; N],
) -> [&'s mut [f32]; N] {
    let mut order: [usize; N] = core::array::from_fn(|i| i);
    order.sort_unstable_by_key(|&i| ranges[i].start);
    let mut views: [&'s mut [f32]; N] = core::array::from_fn(|_| Default::default());
    let mut rest = arena;
    let mut offset = 0;
    for i in order {
        let Range { start, end } = ranges[i].clone();
        if start < offset || end > offset + rest.len() {
            continue;
        }
        let (_, tail) = core::mem::take(&mut rest).split_at_mut(start - offset);
        let (view, tail) = tail.split_at_mut(end - start);
        views[i] = view;
        rest = tail;
        offset = end;
    }
    views
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_come_back_in_the_order_asked() {
        let mut arena: Vec<f32> = (0..10).map(|i| i as f32).collect();
        let [a, b, c] = split(&mut arena, [6..8, 0..2, 3..4]);
        assert_eq!(
            (a.to_vec(), b.to_vec(), c.to_vec()),
            (vec![6.0, 7.0], vec![0.0, 1.0], vec![3.0])
        );
        a[0] = -1.0;
        assert_eq!(arena[6], -1.0);
    }

    #[test]
    fn overlapping_ranges_are_never_aliased() {
        let mut arena = vec![0f32; 8];
        let [a, b] = split(&mut arena, [0..4, 2..6]);
        assert_eq!((a.len(), b.len()), (4, 0));
    }
}
