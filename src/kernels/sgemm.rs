//! `C += A B^T` in f32 where both operands are contiguous along k, as in a Linear layer
//! (activations `x` (m, k) times the `(n, k)` weight) or attention's `Q K^T`.
//!
//! Why not the `gemm` crate here: it packs both operands into panels on every call (12% of
//! CLIP ViT-L/14's time, the weight re-packed once per row tile), and its micro-kernel reached
//! ~70% of torch's throughput on these shapes. Reading both operands along k needs no packing
//! at all: the micro-kernel keeps a 3 x 4 block of 8-lane dot products in registers
//! (12 accumulators, 3 row vectors, 1 weight vector: the 16 AVX registers), so each step of
//! 8 k-values issues 12 FMAs against 7 loads, and reduces the lanes once per k block.
//!
//! The summation order of every output element is fixed by k alone (8-lane partial sums over
//! blocks of `KC`, then the tail), never by the tiling or the thread count, so results are
//! the same bits however the caller splits the work.

/// Rows of A per micro-kernel.
pub const MR: usize = 3;
/// Rows of B (output columns) per micro-kernel.
pub const NR: usize = 4;
/// k values per block: 3 rows of A (12 KiB) stay in L1 across a sweep of B rows.
const KC: usize = 1024;
/// Rows of B per sweep: 32 x `KC` floats (128 KiB) stay in L2 across the rows of A.
const NB: usize = 32;

/// Whether the fast path runs on this CPU (x86-64 with AVX2 and FMA).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `C[i][j] += sum_p A[i][p] * B[j][p]` for `i < m`, `j < n`, single-threaded.
///
/// # Safety
/// `a` must be valid for reads of `m` rows of `k` floats at row stride `lda`, `b` for `n`
/// rows at stride `ldb`, `c` for reads and writes of `m` rows of `n` at stride `ldc`; `c`
/// must not overlap `a` or `b`, and [`available`] must be true.
pub unsafe fn gemm_nt(
    (m, n, k): (usize, usize, usize),
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
) {
    #[cfg(target_arch = "x86_64")]
    {
        debug_assert!(available());
        // SAFETY: forwarded from the caller's contract.
        unsafe { avx2::gemm_nt((m, n, k), a, lda, b, ldb, c, ldc) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (m, n, k, a, lda, b, ldb, c, ldc);
        unreachable!("sgemm::available() is false off x86-64");
    }
}

/// Rows of A per packed micro-kernel.
const PMR: usize = 6;
/// Columns (rows of B) per packed panel: two 8-lane vectors.
const PNR: usize = 16;
/// k values per packed block: a 6-row A micro-panel (6 KiB) stays in L1, a 16-column B
/// panel (16 KiB) streams from L2.
const PKC: usize = 256;
/// Columns per packed B block: 256 x `PKC` floats (256 KiB) stay in L2 for every row.
const PNC: usize = 256;
/// Row ranges per thread in the packed path (more than one, for a host whose cores are
/// not equally free).
const ROW_TASKS_PER_THREAD: usize = 2;
/// Below this many rows, packing B costs more than it saves: the unpacked kernel runs.
pub const PACK_MIN_ROWS: usize = 192;

/// Raw pointers shared by the parallel tasks.
#[derive(Clone, Copy)]
struct P(*const f32, *mut f32);
// SAFETY: tasks read through the const pointer and write disjoint ranges through the mut one.
unsafe impl Send for P {}
unsafe impl Sync for P {}
impl P {
    fn r(self) -> *const f32 {
        self.0
    }
    fn w(self) -> *mut f32 {
        self.1
    }
}

/// B (`n x k`) packed for the outer-product kernel: panel q holds columns 16q..16q+16 as k
/// rows of 16 floats, zero-padded past n. Same memory as B, so a layer can keep only this.
#[derive(Debug, Clone)]
pub struct PackedB {
    n: usize,
    k: usize,
    data: Vec<f32>,
}

impl PackedB {
    /// Packs `b` (n rows of k, row stride `ldb`) over every core.
    pub fn pack(b: &[f32], (n, k): (usize, usize), ldb: usize) -> Self {
        use rayon::prelude::*;
        assert!(
            n == 0 || b.len() >= (n - 1) * ldb + k,
            "PackedB: b is too short"
        );
        let panels = n.div_ceil(PNR);
        let mut data = vec![0f32; panels * k * PNR];
        data.par_chunks_mut((k * PNR).max(1))
            .enumerate()
            .for_each(|(q, panel)| {
                let cols = PNR.min(n - q * PNR);
                let rows: Vec<&[f32]> = (0..cols)
                    .map(|jj| &b[(q * PNR + jj) * ldb..][..k])
                    .collect();
                // 8 k-values of each row at a time: sequential reads of 16 rows, and each
                // written 16-float row of the panel is one cache line.
                for p0 in (0..k).step_by(8) {
                    let pe = (p0 + 8).min(k);
                    for (jj, row) in rows.iter().enumerate() {
                        for (p, v) in row[p0..pe].iter().enumerate() {
                            panel[(p0 + p) * PNR + jj] = *v;
                        }
                    }
                }
            });
        PackedB { n, k, data }
    }

    /// (n, k) of the packed matrix.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// `B^T` (`k x n`) packed, read from this packing (the original `B` may be gone): a
    /// Linear's input gradient `g W` is `g (W^T)^T`, the same kernel on the transpose.
    pub fn transposed(&self) -> Self {
        use rayon::prelude::*;
        let (n, k) = (self.n, self.k);
        let panels = k.div_ceil(PNR);
        let mut data = vec![0f32; panels * n * PNR];
        // Panel q of the result holds B[j][16q..16q+16] as its row j; in this packing B[j][p]
        // is at (j / 16) * k * 16 + p * 16 + j % 16.
        data.par_chunks_mut((n * PNR).max(1))
            .enumerate()
            .for_each(|(q, panel)| {
                let cols = PNR.min(k - q * PNR);
                for (j, row) in panel.chunks_exact_mut(PNR).enumerate() {
                    let src = &self.data[(j / PNR) * k * PNR + j % PNR..];
                    for (pp, v) in row[..cols].iter_mut().enumerate() {
                        *v = src[(q * PNR + pp) * PNR];
                    }
                }
            });
        PackedB { n: k, k: n, data }
    }
}

/// [`gemm_nt`] over every core, for `m` rows of A: with `m >= PACK_MIN_ROWS` B is packed
/// ([`PackedB`]) and [`gemm_nt_packed`] runs; fewer rows go through the unpacked kernel,
/// split over the columns. The summation order of an element is fixed by k alone within a
/// path (the two paths differ, so which runs depends only on `m`).
///
/// # Safety
/// As [`gemm_nt`].
pub unsafe fn gemm_nt_par(
    (m, n, k): (usize, usize, usize),
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
) {
    use rayon::prelude::*;
    if m >= PACK_MIN_ROWS {
        // SAFETY: the caller guarantees n rows of k at stride ldb.
        let bs =
            unsafe { std::slice::from_raw_parts(b, if n == 0 { 0 } else { (n - 1) * ldb + k }) };
        let packed = PackedB::pack(bs, (n, k), ldb);
        // SAFETY: forwarded.
        unsafe { gemm_nt_packed(m, a, lda, &packed, c, ldc) };
        return;
    }
    let (pa, pb) = (P(a, c), P(b, std::ptr::null_mut()));
    let threads = rayon::current_num_threads();
    let cols = n.div_ceil(4 * threads).next_multiple_of(NR).max(NR);
    (0..n.div_ceil(cols)).into_par_iter().for_each(|t| {
        let j0 = t * cols;
        // SAFETY: column range j0..j0+nc of c is this task's alone.
        unsafe {
            gemm_nt(
                (m, cols.min(n - j0), k),
                pa.r(),
                lda,
                pb.r().add(j0 * ldb),
                ldb,
                pa.w().add(j0),
                ldc,
            )
        }
    });
}

/// `C += A B^T` over every core with B already packed: a 6 x 16 outer-product micro-kernel,
/// each task a long range of rows, so each core keeps a 256 x 256 block of B in its L2 for
/// hundreds of rows. The summation order of an element is fixed by k alone.
///
/// # Safety
/// `a` valid for `m` rows of `b.dims().1` floats at stride `lda`, `c` for `m` rows of
/// `b.dims().0` at stride `ldc`, not overlapping `a`; [`available`] must be true.
pub unsafe fn gemm_nt_packed(
    m: usize,
    a: *const f32,
    lda: usize,
    b: &PackedB,
    c: *mut f32,
    ldc: usize,
) {
    use rayon::prelude::*;
    let (n, k) = (b.n, b.k);
    if m == 0 || n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let panels = n.div_ceil(PNR);
        let (pa, packed) = (P(a, c), P(b.data.as_ptr(), std::ptr::null_mut()));
        // Tasks of whole micro-panels whose sizes differ by at most one, so each thread's
        // share is even (CLIP's 200 rows in chunks of 54 gave one thread 108, the other 92).
        let micro = m.div_ceil(PMR);
        let tasks = (ROW_TASKS_PER_THREAD * rayon::current_num_threads()).min(micro);
        (0..tasks).into_par_iter().for_each(|t| {
            let i0 = t * micro / tasks * PMR;
            let i1 = ((t + 1) * micro / tasks * PMR).min(m);
            let mut q0 = 0;
            while q0 < panels {
                let q1 = (q0 + PNC / PNR).min(panels);
                let mut k0 = 0;
                while k0 < k {
                    let kc = PKC.min(k - k0);
                    let mut i = i0;
                    while i < i1 {
                        let mr = PMR.min(i1 - i);
                        for q in q0..q1 {
                            let nr = PNR.min(n - q * PNR);
                            // SAFETY: rows i..i+mr (this task's) and columns 16q..16q+nr of
                            // c; values k0..k0+kc of panel q.
                            unsafe {
                                avx2::micro_packed(
                                    kc,
                                    pa.r().add(i * lda + k0),
                                    lda,
                                    mr,
                                    packed.r().add(q * k * PNR + k0 * PNR),
                                    nr,
                                    pa.w().add(i * ldc + q * PNR),
                                    ldc,
                                )
                            };
                        }
                        i += PMR;
                    }
                    k0 += kc;
                }
                q0 = q1;
            }
        });
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (a, lda, c, ldc, k);
        unreachable!("sgemm::available() is false off x86-64");
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{KC, MR, NB, NR, PMR, PNR};

    /// `c[0..mr][0..nr] += A[0..mr][0..kc] * panel`, the panel being kc rows of 16 columns.
    /// Rows past `mr` repeat the last valid one and are not stored.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn micro_packed(
        kc: usize,
        a: *const f32,
        lda: usize,
        mr: usize,
        panel: *const f32,
        nr: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        // SAFETY (whole body): mr rows of kc values of a, kc x 16 panel floats and the
        // mr x nr block of c are in range by the caller's contract.
        unsafe {
            let r = |i: usize| a.add(lda * i.min(mr - 1));
            let (a0, a1, a2, a3, a4, a5) = (r(0), r(1), r(2), r(3), r(4), r(5));
            let z = _mm256_setzero_ps();
            let (mut c00, mut c01, mut c10, mut c11, mut c20, mut c21) = (z, z, z, z, z, z);
            let (mut c30, mut c31, mut c40, mut c41, mut c50, mut c51) = (z, z, z, z, z, z);
            for p in 0..kc {
                let b0 = _mm256_loadu_ps(panel.add(p * PNR));
                let b1 = _mm256_loadu_ps(panel.add(p * PNR + 8));
                let x = _mm256_broadcast_ss(&*a0.add(p));
                c00 = _mm256_fmadd_ps(x, b0, c00);
                c01 = _mm256_fmadd_ps(x, b1, c01);
                let x = _mm256_broadcast_ss(&*a1.add(p));
                c10 = _mm256_fmadd_ps(x, b0, c10);
                c11 = _mm256_fmadd_ps(x, b1, c11);
                let x = _mm256_broadcast_ss(&*a2.add(p));
                c20 = _mm256_fmadd_ps(x, b0, c20);
                c21 = _mm256_fmadd_ps(x, b1, c21);
                let x = _mm256_broadcast_ss(&*a3.add(p));
                c30 = _mm256_fmadd_ps(x, b0, c30);
                c31 = _mm256_fmadd_ps(x, b1, c31);
                let x = _mm256_broadcast_ss(&*a4.add(p));
                c40 = _mm256_fmadd_ps(x, b0, c40);
                c41 = _mm256_fmadd_ps(x, b1, c41);
                let x = _mm256_broadcast_ss(&*a5.add(p));
                c50 = _mm256_fmadd_ps(x, b0, c50);
                c51 = _mm256_fmadd_ps(x, b1, c51);
            }
            let acc = [
                [c00, c01],
                [c10, c11],
                [c20, c21],
                [c30, c31],
                [c40, c41],
                [c50, c51],
            ];
            for (i, row) in acc.iter().enumerate().take(mr.min(PMR)) {
                let dst = c.add(i * ldc);
                if nr == PNR {
                    _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_loadu_ps(dst), row[0]));
                    _mm256_storeu_ps(
                        dst.add(8),
                        _mm256_add_ps(_mm256_loadu_ps(dst.add(8)), row[1]),
                    );
                } else {
                    let mut tmp = [0f32; PNR];
                    _mm256_storeu_ps(tmp.as_mut_ptr(), row[0]);
                    _mm256_storeu_ps(tmp.as_mut_ptr().add(8), row[1]);
                    for (j, v) in tmp.iter().enumerate().take(nr) {
                        *dst.add(j) += v;
                    }
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gemm_nt(
        (m, n, k): (usize, usize, usize),
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        let mut k0 = 0;
        while k0 < k {
            let kc = KC.min(k - k0);
            let mut j0 = 0;
            while j0 < n {
                let nb = NB.min(n - j0);
                let mut i = 0;
                while i < m {
                    let mr = MR.min(m - i);
                    let mut j = j0;
                    while j < j0 + nb {
                        let nr = NR.min(j0 + nb - j);
                        // SAFETY: i < m, j < n, k0 + kc <= k: inside the caller's ranges.
                        unsafe {
                            micro(
                                kc,
                                a.add(i * lda + k0),
                                lda,
                                mr,
                                b.add(j * ldb + k0),
                                ldb,
                                nr,
                                c.add(i * ldc + j),
                                ldc,
                            )
                        };
                        j += NR;
                    }
                    i += MR;
                }
                j0 += NB;
            }
            k0 += kc;
        }
    }

    /// Sums of four vectors' lanes: `[sum a, sum b, sum c, sum d]`.
    #[inline(always)]
    unsafe fn hsum4(a: __m256, b: __m256, c: __m256, d: __m256) -> __m128 {
        let ab = _mm256_hadd_ps(a, b);
        let cd = _mm256_hadd_ps(c, d);
        let abcd = _mm256_hadd_ps(ab, cd);
        _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1))
    }

    /// One `mr x nr` (at most 3 x 4) block over `kc` values of k. Missing rows and columns
    /// repeat the last valid one, so the loop has no branches; their sums are not stored.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn micro(
        kc: usize,
        a: *const f32,
        lda: usize,
        mr: usize,
        b: *const f32,
        ldb: usize,
        nr: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        // SAFETY (whole body): rows < mr of a, rows < nr of b and kc values of each are in
        // range by the caller's contract; c's mr x nr block likewise.
        unsafe {
            let a0 = a;
            let a1 = a.add(lda * 1.min(mr - 1));
            let a2 = a.add(lda * 2.min(mr - 1));
            let b0 = b;
            let b1 = b.add(ldb * 1.min(nr - 1));
            let b2 = b.add(ldb * 2.min(nr - 1));
            let b3 = b.add(ldb * 3.min(nr - 1));
            let z = _mm256_setzero_ps();
            let (mut c00, mut c01, mut c02, mut c03) = (z, z, z, z);
            let (mut c10, mut c11, mut c12, mut c13) = (z, z, z, z);
            let (mut c20, mut c21, mut c22, mut c23) = (z, z, z, z);
            let kv = kc / 8 * 8;
            let mut p = 0;
            while p < kv {
                let x0 = _mm256_loadu_ps(a0.add(p));
                let x1 = _mm256_loadu_ps(a1.add(p));
                let x2 = _mm256_loadu_ps(a2.add(p));
                let w = _mm256_loadu_ps(b0.add(p));
                c00 = _mm256_fmadd_ps(x0, w, c00);
                c10 = _mm256_fmadd_ps(x1, w, c10);
                c20 = _mm256_fmadd_ps(x2, w, c20);
                let w = _mm256_loadu_ps(b1.add(p));
                c01 = _mm256_fmadd_ps(x0, w, c01);
                c11 = _mm256_fmadd_ps(x1, w, c11);
                c21 = _mm256_fmadd_ps(x2, w, c21);
                let w = _mm256_loadu_ps(b2.add(p));
                c02 = _mm256_fmadd_ps(x0, w, c02);
                c12 = _mm256_fmadd_ps(x1, w, c12);
                c22 = _mm256_fmadd_ps(x2, w, c22);
                let w = _mm256_loadu_ps(b3.add(p));
                c03 = _mm256_fmadd_ps(x0, w, c03);
                c13 = _mm256_fmadd_ps(x1, w, c13);
                c23 = _mm256_fmadd_ps(x2, w, c23);
                p += 8;
            }
            let mut s = [[0f32; 4]; 3];
            _mm_storeu_ps(s[0].as_mut_ptr(), hsum4(c00, c01, c02, c03));
            _mm_storeu_ps(s[1].as_mut_ptr(), hsum4(c10, c11, c12, c13));
            _mm_storeu_ps(s[2].as_mut_ptr(), hsum4(c20, c21, c22, c23));
            if kv < kc {
                let rows = [a0, a1, a2];
                let cols = [b0, b1, b2, b3];
                for (r, row) in rows.iter().enumerate() {
                    for (j, col) in cols.iter().enumerate() {
                        for q in kv..kc {
                            s[r][j] += *row.add(q) * *col.add(q);
                        }
                    }
                }
            }
            for (r, sr) in s.iter().enumerate().take(mr) {
                let dst = c.add(r * ldc);
                for (j, v) in sr.iter().enumerate().take(nr) {
                    *dst.add(j) += v;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        // A small LCG: reproducible, no dependency, values in [-1, 1).
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / (1u32 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// Against an f64 triple loop, on shapes that exercise every edge: m and n not multiples
    /// of the block, k with a tail and k spanning more than one block, strided operands.
    #[test]
    fn matches_f64_on_ragged_shapes() {
        if !available() {
            eprintln!("skipped: no AVX2/FMA on this CPU");
            return;
        }
        for (i, &(m, n, k, pad)) in [
            (1, 1, 1, 0),
            (5, 7, 13, 3),
            (3, 4, 8, 0),
            (17, 33, 1031, 5),
            (40, 70, 2100, 0),
            (2, 130, 64, 1),
        ]
        .iter()
        .enumerate()
        {
            let (lda, ldb, ldc) = (k + pad, k + 2 * pad, n + pad);
            let a = values(m * lda, i as u32);
            let b = values(n * ldb, 100 + i as u32);
            let c0 = values(m * ldc, 200 + i as u32);
            let mut c = c0.clone();
            // SAFETY: the buffers hold m x lda, n x ldb and m x ldc floats.
            unsafe {
                gemm_nt(
                    (m, n, k),
                    a.as_ptr(),
                    lda,
                    b.as_ptr(),
                    ldb,
                    c.as_mut_ptr(),
                    ldc,
                )
            };
            for r in 0..m {
                for j in 0..ldc {
                    let got = c[r * ldc + j] as f64;
                    if j >= n {
                        assert_eq!(c[r * ldc + j], c0[r * ldc + j], "padding written");
                        continue;
                    }
                    let want = c0[r * ldc + j] as f64
                        + (0..k)
                            .map(|p| a[r * lda + p] as f64 * b[j * ldb + p] as f64)
                            .sum::<f64>();
                    let tol = 1e-5 * (k as f64).sqrt().max(1.0);
                    assert!(
                        (got - want).abs() <= tol,
                        "case {i} ({m}x{n}x{k}) [{r}][{j}]: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// The transpose of a packing, used as B, gives `A B` (an f64 triple loop); transposing
    /// twice gives the packing back bit for bit.
    #[test]
    fn transposed_packing_multiplies_by_b() {
        if !available() {
            return;
        }
        for (i, &(m, n, k)) in [(1, 1, 1), (7, 17, 33), (200, 40, 70), (5, 16, 3)]
            .iter()
            .enumerate()
        {
            let a = values(m * n, i as u32);
            let b = values(n * k, 10 + i as u32);
            let packed = PackedB::pack(&b, (n, k), k);
            let t = packed.transposed();
            assert_eq!(t.dims(), (k, n));
            assert_eq!(t.transposed().data, packed.data, "case {i}: round trip");
            let mut c = vec![0f32; m * k];
            // SAFETY: a is m x n, c is m x k, t packs a k x n matrix.
            unsafe { gemm_nt_packed(m, a.as_ptr(), n, &t, c.as_mut_ptr(), k) };
            for r in 0..m {
                for p in 0..k {
                    let want: f64 = (0..n)
                        .map(|j| a[r * n + j] as f64 * b[j * k + p] as f64)
                        .sum();
                    let got = c[r * k + p] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * (n as f64).sqrt().max(1.0),
                        "case {i} [{r}][{p}]: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// The bits of an element do not depend on how the output is split into calls.
    #[test]
    fn tiling_does_not_change_bits() {
        if !available() {
            return;
        }
        let (m, n, k) = (10, 12, 1500);
        let a = values(m * k, 1);
        let b = values(n * k, 2);
        let mut whole = vec![0f32; m * n];
        let mut parts = vec![0f32; m * n];
        // SAFETY: buffers sized m x k, n x k, m x n; sub-blocks stay inside them.
        unsafe {
            gemm_nt(
                (m, n, k),
                a.as_ptr(),
                k,
                b.as_ptr(),
                k,
                whole.as_mut_ptr(),
                n,
            );
            for (r0, rows) in [(0, 4), (4, 1), (5, 5)] {
                for (j0, cols) in [(0, 7), (7, 5)] {
                    gemm_nt(
                        (rows, cols, k),
                        a.as_ptr().add(r0 * k),
                        k,
                        b.as_ptr().add(j0 * k),
                        k,
                        parts.as_mut_ptr().add(r0 * n + j0),
                        n,
                    );
                }
            }
        }
        assert_eq!(whole, parts);
    }
}
