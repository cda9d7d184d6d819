//! Fresh f32 buffers for the host kernels, written by every thread at once.
//!
//! `vec![0.0; len]` clears a buffer on the calling thread while the pool's other threads wait,
//! and mimalloc hands back recycled memory, so the clearing is a real pass over MBs: in a
//! ResNet-18 training step these serial `memset`s were 8 % of the samples. Buffers that a
//! kernel overwrites whole are better not cleared at all ([`par_filled`]), the others cleared by
//! all threads ([`par_zeros`]).

use std::mem::MaybeUninit;

use rayon::prelude::*;

/// Below this many values a buffer is made on the calling thread: splitting costs more.
const PARALLEL_FROM: usize = 1 << 15;

/// A vector of `len` values whose chunks of `chunk` values (the last may be shorter) are
/// written by `fill(index, chunk)` in parallel, never cleared first.
///
/// # Safety
/// `fill` must write every element of the chunk it is given.
///
/// # Panics
/// If `chunk` is 0 while `len` is not.
pub unsafe fn par_filled<F>(len: usize, chunk: usize, fill: F) -> Vec<f32>
where
    F: Fn(usize, &mut [MaybeUninit<f32>]) + Sync,
{
    let mut values = Vec::with_capacity(len);
    if len > 0 {
        assert!(chunk > 0, "chunks of zero values");
        values.spare_capacity_mut()[..len]
            .par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(index, part)| fill(index, part));
    }
    // SAFETY: every chunk covers its part of `0..len` and `fill` wrote all of it (the
    // caller's contract).
    unsafe { values.set_len(len) };
    values
}

/// `len` zeros, cleared by all threads when the buffer is large.
pub fn par_zeros(len: usize) -> Vec<f32> {
    if len < PARALLEL_FROM {
        return vec![0.0; len];
    }
    let chunk = len
        .div_ceil(2 * rayon::current_num_threads())
        .max(PARALLEL_FROM / 2);
    // SAFETY: `fill` writes every element of its chunk.
    unsafe { par_filled(len, chunk, |_, part| part.fill(MaybeUninit::new(0.0))) }
}

/// Writes `values` into `target` (same length).
///
/// # Panics
/// If the lengths differ.
pub fn write_copy(target: &mut [MaybeUninit<f32>], values: &[f32]) {
    assert_eq!(target.len(), values.len(), "copy of another length");
    for (target, value) in target.iter_mut().zip(values) {
        target.write(*value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeros_and_fills_cover_every_value() {
        for len in [0, 1, 1000, PARALLEL_FROM, 3 * PARALLEL_FROM + 7] {
            let zeros = par_zeros(len);
            assert_eq!(zeros.len(), len);
            assert!(zeros.iter().all(|&value| value == 0.0));
            let chunk = 513;
            // SAFETY: the closure writes every element of its chunk.
            let filled = unsafe {
                par_filled(len, chunk, |index, part| {
                    for (offset, value) in part.iter_mut().enumerate() {
                        value.write((index * chunk + offset) as f32);
                    }
                })
            };
            assert!(
                filled
                    .iter()
                    .enumerate()
                    .all(|(index, &value)| value == index as f32)
            );
        }
    }
}
