//! Scaled dot-product attention, `softmax(scale Q K^T) V`, on tokens-by-(heads x dim) layouts.
//!
//! On the CPU in f32 this is a blocked kernel: for a block of query rows and one head it
//! computes the score block with one GEMM, takes the softmax in place, and multiplies by V
//! with a second GEMM, so the `(heads, n, m)` score tensor (1 GiB in f32 for SD 1.5 at
//! 512x512, batch 2) is never materialised and each block's scores stay in cache. Heads are
//! read and written at their column offset, so no head-major copies are made either. Other
//! devices and dtypes take the composed candle path, which is the reference the kernel is
//! tested against.

use std::cell::RefCell;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::{contiguous_f32, vmath};
use crate::Result;

/// Bytes of scores a task keeps at once. Measured on SD 1.5's 4,096-token attention (2-core
/// EPYC, 512 KiB L2 per core): 256 KiB blocks took 0.69 s, 1 MiB 0.44 s, 2 MiB 0.41 s, 4 MiB
/// 0.41 s: larger blocks amortise the GEMM's packing of K, and a row (16 KiB) still fits L1
/// for the softmax.
const SCORE_BLOCK_BYTES: usize = 2 * 1024 * 1024;
/// Most query rows per block (bounds the per-row normaliser buffer).
const MAX_ROWS: usize = 256;

/// Attention over `q: (b, n, heads*d)`, `k, v: (b, m, heads*d)`; returns `(b, n, heads*d)`.
///
/// No mask. `scale` multiplies the logits (usually `1/sqrt(d)`). In f16/bf16 the softmax
/// accumulates in f32, as diffusers' `upcast_softmax` does.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    if q.device().is_cpu() && q.dtype() == DType::F32 {
        let op = BlockedAttention {
            heads,
            scale: scale as f32,
        };
        return Ok(q
            .contiguous()?
            .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)?);
    }
    composed(q, k, v, heads, scale)
}

/// The plain composition: head-major copies, `Q K^T`, softmax, `P V`.
pub fn composed(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    // candle's CUDA softmax kernel sums f16/bf16 rows in f32 already; converting
    // the (b*heads, n, m) score tensor to f32 and back would move it through memory three more
    // times, the largest cost of this composition at 64x64 latents.
    let half_kernel = q.device().is_cuda();
    composed_with(q, k, v, heads, scale, half_kernel, |s| {
        candle_nn::ops::softmax_last_dim(s)
    })
}

/// The composition with candle's plain `softmax`, whose backward is right
/// (`softmax_last_dim` has none), for paths that need gradients.
pub fn differentiable(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    composed_with(q, k, v, heads, scale, false, |s| {
        candle_nn::ops::softmax(s, D::Minus1)
    })
}

fn composed_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    half_softmax: bool,
    softmax: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
) -> Result<Tensor> {
    let (b, n, hd) = q.dims3()?;
    let m = k.dim(1)?;
    let d = hd / heads;
    let head_major = |t: &Tensor, len: usize| -> candle_core::Result<Tensor> {
        t.reshape((b, len, heads, d))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * heads, len, d))
    };
    // The scale is folded into Q's copy: it keeps f16 logits away from overflow.
    let q = head_major(&q.affine(scale, 0.0)?, n)?;
    let k = head_major(k, m)?;
    let v = head_major(v, m)?;
    let scores = q.matmul(&k.t()?)?;
    let dtype = scores.dtype();
    let probs = match dtype {
        DType::F16 | DType::BF16 if !half_softmax => {
            softmax(&scores.to_dtype(DType::F32)?)?.to_dtype(dtype)?
        }
        _ => softmax(&scores)?,
    };
    Ok(probs
        .matmul(&v)?
        .reshape((b, heads, n, d))?
        .transpose(1, 2)?
        .reshape((b, n, hd))?)
}

struct BlockedAttention {
    heads: usize,
    scale: f32,
}

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl CustomOp3 for BlockedAttention {
    fn name(&self) -> &'static str {
        "blocked-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, n, hd) = lq.shape().dims3()?;
        let (bk, m, hdk) = lk.shape().dims3()?;
        if lv.shape() != lk.shape() || bk != b || hdk != hd || hd % self.heads != 0 {
            candle_core::bail!(
                "attention shapes q {:?}, k {:?}, v {:?} with {} heads do not fit",
                lq.shape(),
                lk.shape(),
                lv.shape(),
                self.heads
            );
        }
        let op = self.name();
        let (q, k, v) = (
            contiguous_f32(sq, lq, op)?,
            contiguous_f32(sk, lk, op)?,
            contiguous_f32(sv, lv, op)?,
        );
        let mut out = vec![0f32; b * n * hd];
        let rows = (SCORE_BLOCK_BYTES / (4 * m.max(1)))
            .clamp(8, MAX_ROWS)
            .min(n.max(1));
        // Chunk per batch item first so the short last block of an item stays in its item.
        out.par_chunks_mut(n * hd)
            .enumerate()
            .for_each(|(bi, out_item)| {
                out_item
                    .par_chunks_mut(rows * hd)
                    .enumerate()
                    .for_each(|(blk, out_block)| {
                        let r0 = blk * rows;
                        let nr = out_block.len() / hd;
                        let q_rows = &q[(bi * n + r0) * hd..(bi * n + r0 + nr) * hd];
                        let kb = &k[bi * m * hd..(bi + 1) * m * hd];
                        let vb = &v[bi * m * hd..(bi + 1) * m * hd];
                        self.block(q_rows, kb, vb, out_block, nr, m, hd);
                    });
            });
        Ok((CpuStorage::F32(out), Shape::from((b, n, hd))))
    }
}

impl BlockedAttention {
    /// One block of `nr` query rows, all heads: `out = softmax(scale q k^T) v` per head.
    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &mut [f32],
        nr: usize,
        m: usize,
        hd: usize,
    ) {
        let d = hd / self.heads;
        SCORES.with(|cell| {
            let mut scores = cell.borrow_mut();
            scores.resize(nr * m, 0.0);
            for h in 0..self.heads {
                let c0 = h * d;
                // SAFETY: every pointer/stride pair stays inside its slice: q is nr x hd, k and
                // v are m x hd (row stride hd, head columns c0..c0+d), scores is nr x m, out
                // is nr x hd.
                unsafe {
                    gemm::gemm(
                        nr,
                        m,
                        d,
                        scores.as_mut_ptr(),
                        1,
                        m as isize,
                        false,
                        q.as_ptr().add(c0),
                        1,
                        hd as isize,
                        k.as_ptr().add(c0),
                        hd as isize,
                        1,
                        0.0,
                        self.scale,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                let mut inv = [0f32; MAX_ROWS];
                for (r, row) in scores.chunks_exact_mut(m).enumerate() {
                    inv[r] = 1.0 / vmath::exp_shifted_row(row);
                }
                // SAFETY: as above.
                unsafe {
                    gemm::gemm(
                        nr,
                        d,
                        m,
                        out.as_mut_ptr().add(c0),
                        1,
                        hd as isize,
                        false,
                        scores.as_ptr(),
                        1,
                        m as isize,
                        v.as_ptr().add(c0),
                        1,
                        hd as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                for (r, row) in out.chunks_exact_mut(hd).enumerate() {
                    for x in &mut row[c0..c0 + d] {
                        *x *= inv[r];
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{f64, randn, rel_err_vs_f64};

    #[test]
    fn blocked_matches_composed_on_awkward_shapes() {
        // Query counts that are not multiples of the block, cross-attention (m != n), one head,
        // several batch items, and a long key axis that forces several query blocks.
        for (i, (b, n, m, heads, d)) in [
            (2, 37, 37, 3, 8),
            (3, 5, 77, 8, 40),
            (1, 1, 9, 1, 4),
            (2, 300, 2100, 2, 16),
        ]
        .into_iter()
        .enumerate()
        {
            let seed = 10 * i as u64;
            let q = randn(&[b, n, heads * d], 2.0, seed);
            let k = randn(&[b, m, heads * d], 2.0, seed + 1);
            let v = randn(&[b, m, heads * d], 1.0, seed + 2);
            let scale = 1.0 / (d as f64).sqrt();
            let got = attention(&q, &k, &v, heads, scale).unwrap();
            // The composed path in f64 is the reference (in f64 it never takes the kernel).
            let want = composed(&f64(&q), &f64(&k), &f64(&v), heads, scale).unwrap();
            assert_eq!(got.dims(), want.dims());
            let err = rel_err_vs_f64(&got, &want);
            assert!(err < 1e-6, "b={b} n={n} m={m} heads={heads}: {err}");
        }
    }

    #[test]
    fn non_contiguous_inputs_are_accepted() {
        let q = randn(&[12, 2, 6], 1.0, 1).transpose(0, 1).unwrap();
        let k = randn(&[2, 9, 6], 1.0, 2);
        let got = attention(&q, &k, &k, 2, 0.5).unwrap();
        let want = composed(&f64(&q), &f64(&k), &f64(&k), 2, 0.5).unwrap();
        assert!(rel_err_vs_f64(&got, &want) < 1e-6);
    }
}
