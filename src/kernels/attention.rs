//! Scaled dot-product attention, `softmax(scale Q K^T) V`, on tokens-by-(heads x dim) layouts.
//!
//! On the CPU in f32 this is a blocked kernel: for a block of query rows and one head it
//! computes the score block with one GEMM, takes the softmax in place, and multiplies by V
//! with a second GEMM, so the `(heads, n, m)` score tensor (1 GiB in f32 for SD 1.5 at
//! 512x512, batch 2) is never materialised and each block's scores stay in cache. Heads are
//! read and written at their column offset, so no head-major copies are made either. On CUDA
//! with the `attention` kernel group (`ARTGUIDE_CUDA_KERNELS`) the same layout goes through
//! cuBLAS strided batched GEMMs ([`super::head_gemm`]). Other devices and dtypes take the
//! composed candle path, which is the reference the kernels are tested against.

use std::cell::RefCell;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::{contiguous_f32, for_each_task, vmath, OutPtr};
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
    #[cfg(feature = "cuda")]
    if super::on_cuda_kernel(q, super::CudaKernel::Attention) {
        return Ok(super::cuda::attention(q, k, v, heads, scale)?);
    }
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

/// [`attention`] for paths that need gradients (to q, k and v). On the CPU in f32 the
/// blocked kernel with its own backward, which recomputes each block's probabilities instead
/// of keeping them (candle's composition keeps the scores, the probabilities and several
/// intermediates of their size for its backward); elsewhere [`composed_differentiable`].
pub fn differentiable(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    if !(q.device().is_cpu() && q.dtype() == DType::F32) {
        return composed_differentiable(q, k, v, heads, scale);
    }
    let op = BlockedAttention {
        heads,
        scale: scale as f32,
    };
    Ok(q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

/// The composition with candle's plain `softmax`, whose backward is right
/// (`softmax_last_dim` has none): the reference for [`differentiable`].
pub fn composed_differentiable(
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

    /// Used by [`differentiable`] (inference applies the op without a graph).
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = AttentionGrad {
            heads: self.heads,
            scale: self.scale,
            dout: grad.contiguous()?,
        };
        let all = q
            .contiguous()?
            .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)?;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        Ok((
            Some(all.narrow(0, 0, nq)?.reshape(q.shape())?),
            Some(all.narrow(0, nq, nk)?.reshape(k.shape())?),
            Some(all.narrow(0, nq + nk, nk)?.reshape(v.shape())?),
        ))
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

/// `(dL/dq, dL/dk, dL/dv)`, flattened one after another, of the attention of q, k, v given
/// `dout = dL/d(output)`. Per batch item and head, for each block of query rows: the
/// probabilities P again, `dP = dO V^T`, `dS = P (dP - rowsum(P dP))`, then
/// `dQ = scale dS K`, and `dK += scale dS^T Q`, `dV += P^T dO` over the blocks.
struct AttentionGrad {
    heads: usize,
    scale: f32,
    dout: Tensor,
}

/// A matrix operand of [`mm`]: pointer, column stride, row stride.
type View = (*const f32, isize, isize);

/// `dst = beta (lhs rhs)` (`m x n`, inner `k`), plus `dst` when `accumulate`.
///
/// # Safety
/// Every view must stay inside its buffer for its shape; `dst` must not overlap the others.
#[allow(clippy::too_many_arguments)]
unsafe fn mm(
    (m, n, k): (usize, usize, usize),
    dst: (*mut f32, isize, isize),
    lhs: View,
    rhs: View,
    accumulate: bool,
    beta: f32,
    par: gemm::Parallelism,
) {
    gemm::gemm(
        m, n, k, dst.0, dst.1, dst.2, accumulate, lhs.0, lhs.1, lhs.2, rhs.0, rhs.1, rhs.2, 1.0,
        beta, false, false, false, par,
    );
}

impl CustomOp3 for AttentionGrad {
    fn name(&self) -> &'static str {
        "blocked-attention-backward"
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
        let op = self.name();
        let (b, n, hd) = lq.shape().dims3()?;
        let m = lk.shape().dims3()?.1;
        if lv.shape() != lk.shape() || self.dout.shape() != lq.shape() {
            candle_core::bail!(
                "{op}: q {:?}, k {:?}, v {:?}, gradient {:?} do not fit",
                lq.shape(),
                lk.shape(),
                lv.shape(),
                self.dout.shape()
            );
        }
        let (q, k, v) = (
            contiguous_f32(sq, lq, op)?,
            contiguous_f32(sk, lk, op)?,
            contiguous_f32(sv, lv, op)?,
        );
        let (storage, layout) = self.dout.storage_and_layout();
        let dout = match &*storage {
            candle_core::Storage::Cpu(s) => contiguous_f32(s, layout, op)?,
            _ => candle_core::bail!("{op}: the gradient is not on the CPU"),
        };
        let d = hd / self.heads;
        let mut out = vec![0f32; b * n * hd + 2 * b * m * hd];
        let base = OutPtr(out.as_mut_ptr());
        // Two score-sized buffers per block (P and dP).
        let rows = (SCORE_BLOCK_BYTES / (8 * m.max(1)))
            .clamp(8, MAX_ROWS)
            .min(n.max(1));
        let (hd_s, m_s, scale) = (hd as isize, m as isize, self.scale);
        for_each_task(b * self.heads, |task, par| {
            let (bi, c0) = (task / self.heads, (task % self.heads) * d);
            let mut p = vec![0f32; rows * m];
            let mut dp = vec![0f32; rows * m];
            // SAFETY: each task reads its batch item's rows and writes the columns
            // c0..c0+d of its item's rows of dq, dk and dv (disjoint across tasks); every
            // view below stays inside q, k, v, dout (rows of hd), p and dp (rows of m).
            unsafe {
                let (qb, kb, vb, gb) = (
                    q.as_ptr().add(bi * n * hd + c0),
                    k.as_ptr().add(bi * m * hd + c0),
                    v.as_ptr().add(bi * m * hd + c0),
                    dout.as_ptr().add(bi * n * hd + c0),
                );
                let dq = base.get().add(bi * n * hd + c0);
                let dk = base.get().add(b * n * hd + bi * m * hd + c0);
                let dv = base.get().add(b * n * hd + b * m * hd + bi * m * hd + c0);
                for r0 in (0..n).step_by(rows) {
                    let nr = rows.min(n - r0);
                    let (qr, gr) = (qb.add(r0 * hd), gb.add(r0 * hd));
                    let (pp, dpp) = (p.as_mut_ptr(), dp.as_mut_ptr());
                    mm(
                        (nr, m, d),
                        (pp, 1, m_s),
                        (qr, 1, hd_s),
                        (kb, hd_s, 1),
                        false,
                        scale,
                        par,
                    );
                    for row in p[..nr * m].chunks_exact_mut(m) {
                        vmath::softmax_row(row);
                    }
                    mm(
                        (nr, m, d),
                        (dpp, 1, m_s),
                        (gr, 1, hd_s),
                        (vb, hd_s, 1),
                        false,
                        1.0,
                        par,
                    );
                    for (pr, dr) in p[..nr * m].chunks_exact(m).zip(dp.chunks_exact_mut(m)) {
                        let dot: f32 = pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
                        for (x, &pv) in dr.iter_mut().zip(pr) {
                            *x = pv * (*x - dot);
                        }
                    }
                    let (pc, dpc) = (p.as_ptr(), dp.as_ptr());
                    let acc = r0 > 0;
                    mm(
                        (nr, d, m),
                        (dq.add(r0 * hd), 1, hd_s),
                        (dpc, 1, m_s),
                        (kb, 1, hd_s),
                        false,
                        scale,
                        par,
                    );
                    mm(
                        (m, d, nr),
                        (dk, 1, hd_s),
                        (dpc, m_s, 1),
                        (qr, 1, hd_s),
                        acc,
                        scale,
                        par,
                    );
                    mm(
                        (m, d, nr),
                        (dv, 1, hd_s),
                        (pc, m_s, 1),
                        (gr, 1, hd_s),
                        acc,
                        1.0,
                        par,
                    );
                }
            }
        });
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{f64, randn, rel_err_vs_f64, weighted_grads};

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

    /// Value and the gradients to q, k and v against candle's composition in f64, on shapes
    /// with several query blocks, cross-attention and more tasks than cores (and fewer).
    #[test]
    fn differentiable_gradients_match_composed_in_f64() {
        for (i, (b, n, m, heads, d)) in
            [(4, 50, 50, 12, 8), (1, 37, 9, 1, 16), (2, 300, 2100, 2, 16)]
                .into_iter()
                .enumerate()
        {
            let seed = 10 * i as u64;
            let inputs = [
                randn(&[b, n, heads * d], 2.0, seed),
                randn(&[b, m, heads * d], 2.0, seed + 1),
                randn(&[b, m, heads * d], 1.0, seed + 2),
            ];
            let r = randn(&[b, n, heads * d], 1.0, seed + 3);
            let scale = 1.0 / (d as f64).sqrt();
            let run = |f64_: bool| {
                let vars: Vec<candle_core::Var> = inputs
                    .iter()
                    .map(|t| candle_core::Var::from_tensor(&if f64_ { f64(t) } else { t.clone() }))
                    .collect::<candle_core::Result<_>>()
                    .unwrap();
                let [q, k, v] = [0, 1, 2].map(|j| vars[j].as_tensor());
                let y = if f64_ {
                    composed_differentiable(q, k, v, heads, scale).unwrap()
                } else {
                    differentiable(q, k, v, heads, scale).unwrap()
                };
                let grads = weighted_grads(&y, &r);
                let g = [q, k, v].map(|t| grads.get(t).unwrap().clone());
                (y, g)
            };
            let ((y, g), (yd, gd)) = (run(false), run(true));
            let e = rel_err_vs_f64(&y, &yd);
            assert!(e < 1e-6, "case {i}: value rel err {e}");
            for (name, (got, want)) in ["q", "k", "v"].iter().zip(g.iter().zip(&gd)) {
                let e = rel_err_vs_f64(got, want);
                assert!(e < 1e-5, "case {i}: d{name} rel err {e}");
            }
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
