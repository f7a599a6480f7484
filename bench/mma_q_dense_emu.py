#!/usr/bin/env python3
# mma_q_dense_emu.py — a CPU emulation of kernels/mma_q.cu's dense FP8 path (mx_convert_kernel, then
# gemv_mma_q_dense_kernel), written without a GPU to check its index arithmetic: the kernel's own expressions for
# the converted rows (bf16 x 2^64, NB * 8 rows), the lanes' weight words and B words, the FP8 decode
# (mq_fp8_lo / mq_fp8_hi through an emulated prmt), mma.m16n8k16 by the PTX fragment layout, the warps' chunk
# split and the final sums, in double; against a double reference of E4M3 values x row scale and bf16-rounded
# activations.  Any mapping slip gives a relative error near 1; a right one ~1e-16 (rows that no lane wrote
# count as "unwritten").  Plain Python (no numpy): python3 bench/mma_q_dense_emu.py
import struct, sys, random, math
rng = random.Random(1)

def f32(x): return struct.unpack('<f', struct.pack('<f', x))[0]
def bf16_bits(f):
    u = struct.unpack('<I', struct.pack('<f', f32(f)))[0]
    if (u & 0x7fffffff) > 0x7f800000: return ((u >> 16) | 0x40) & 0xffff
    u = (u + 0x7fff + ((u >> 16) & 1)) & 0xffffffff
    return u >> 16
def bits_f(h): return struct.unpack('<f', struct.pack('<I', (h & 0xffff) << 16))[0]
def e4m3(b):
    s = -1.0 if b & 0x80 else 1.0; e = (b >> 3) & 15; m = b & 7
    return s * (m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0**(e - 7))
def prmt(a, sel):
    bs = [(a >> (8*i)) & 255 for i in range(4)] + [0]*4
    r = 0
    for i in range(4):
        n = (sel >> (4*i)) & 15; idx = n & 7
        v = bs[idx]
        if n & 8: v = 0xff if v & 0x80 else 0
        r |= v << (8*i)
    return r
def lo(w): return ((prmt(w, 0x9180) << 4) & 0xffffffff) & 0x87f087f0
def hi(w): return ((prmt(w, 0xB3A2) << 4) & 0xffffffff) & 0x87f087f0
def pair(w): return bits_f(w & 0xffff), bits_f(w >> 16)

def run(rows, cols, n, MT):
    NB = 1 if n <= 8 else 2 if n <= 16 else 4 if n <= 32 else 8
    Wb = [[rng.randrange(256) for _ in range(cols)] for _ in range(rows)]
    for r in Wb:
        for k in range(cols):
            if (r[k] & 0x7f) == 0x7f: r[k] ^= 1
    sc = [f32(rng.uniform(-0.02, 0.02)) for _ in range(rows)]
    x = [[f32(rng.uniform(-1, 1) * 3) for _ in range(cols)] for _ in range(n)]
    # conversion: NB*8 rows, bf16(x * 2^64), zero from n
    nrows = NB * 8
    x16 = [0] * (nrows * cols)
    for j in range(n):
        for k in range(cols):
            x16[j * cols + k] = bf16_bits(x[j][k] * 2.0**64)
    Wflat = [b for r in Wb for b in r]
    nchunk = cols >> 6
    y = [[float('nan')] * rows for _ in range(n)]
    blocks = -(-rows // (16 * MT))
    for blk in range(blocks):
        r0 = blk * 16 * MT
        part = {}
        for warp in range(8):
            acc = [[[[0.0]*4 for _ in range(NB)] for _ in range(MT)] for _ in range(32)]
            per_warp = (nchunk - warp + 7) // 8
            for ii in range(per_warp):
                c = warp + 8 * ii
                # per lane: A fragments, B fragments
                A = {}; B = {}
                for lane in range(32):
                    g, t = lane >> 2, lane & 3
                    for m in range(MT):
                        ra = r0 + 16*m + g; rb = ra + 8
                        ra = ra if ra < rows else rows - 1; rb = rb if rb < rows else rows - 1
                        for i in range(4):
                            def word(r):
                                off = r * cols + 16*t + 64*c + 4*i
                                return int(Wflat[off]) | int(Wflat[off+1]) << 8 | int(Wflat[off+2]) << 16 | int(Wflat[off+3]) << 24
                            w0, w1 = word(ra), word(rb)
                            A[(lane, m, i)] = (lo(w0), lo(w1), hi(w0), hi(w1))
                    for nb in range(NB):
                        base = (nb*8 + g) * cols + 16*t + 64*c
                        words = [int(x16[base + 2*k]) | int(x16[base + 2*k + 1]) << 16 for k in range(8)]
                        for i in range(4):
                            # lo = words 0..3 (uint4 x,y,z,w), hi = words 4..7; step i: (i&1 ? z : x, i&1 ? w : y)
                            v = words[0:4] if i < 2 else words[4:8]
                            B[(lane, nb, i)] = (v[2] if i & 1 else v[0], v[3] if i & 1 else v[1])
                # mma per (m, nb, i): gather A[16][16], B[16][8]
                for nb in range(NB):
                    for i in range(4):
                        for m in range(MT):
                            Am = [[0.0]*16 for _ in range(16)]; Bm = [[0.0]*8 for _ in range(16)]
                            for lane in range(32):
                                g, t = lane >> 2, lane & 3
                                a0, a1, a2, a3 = A[(lane, m, i)]
                                Am[g][2*t], Am[g][2*t+1] = pair(a0)
                                Am[g+8][2*t], Am[g+8][2*t+1] = pair(a1)
                                Am[g][2*t+8], Am[g][2*t+9] = pair(a2)
                                Am[g+8][2*t+8], Am[g+8][2*t+9] = pair(a3)
                                b0, b1 = B[(lane, nb, i)]
                                Bm[2*t][g], Bm[2*t+1][g] = pair(b0)
                                Bm[2*t+8][g], Bm[2*t+9][g] = pair(b1)
                            D = [[sum(Am[r][k] * Bm[k][cc] for k in range(16)) for cc in range(8)] for r in range(16)]
                            for lane in range(32):
                                g, t = lane >> 2, lane & 3
                                acc[lane][m][nb][0] += D[g][2*t]; acc[lane][m][nb][1] += D[g][2*t+1]
                                acc[lane][m][nb][2] += D[g+8][2*t]; acc[lane][m][nb][3] += D[g+8][2*t+1]
            part[warp] = acc
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            for m in range(MT):
                for nb in range(NB):
                    for i in range(4):
                        row = r0 + 16*m + g + (8 if i >= 2 else 0); tok = nb*8 + 2*t + (i & 1)
                        v = sum(part[w][lane][m][nb][i] for w in range(8))
                        if row < rows and tok < n:
                            y[tok][row] = v * sc[row] * 2.0**56
    # reference: bf16(x) . fl(q * scale)
    Wd = [[e4m3(b) * sc[r] for b in Wb[r]] for r in range(rows)]
    xb = [[bits_f(bf16_bits(v)) for v in r] for r in x]
    num = den = 0.0; nans = 0
    for j in range(n):
        for r in range(rows):
            ref = sum(xb[j][k] * Wd[r][k] for k in range(cols))
            if math.isnan(y[j][r]): nans += 1; continue
            num += (y[j][r] - ref) ** 2; den += ref * ref
    return math.sqrt(num / den), nans

for rows, cols, n, MT in [(40, 192, 11, 1), (23, 128, 5, 2), (37, 256, 33, 1), (20, 64, 64, 1), (17, 128, 16, 2)]:
    e, nans = run(rows, cols, n, MT)
    print(f"rows {rows} cols {cols} n {n} MT {MT}: rel err {e:.2e}, unwritten {nans}")
