//! Floating-point helpers shared by x87 and SSE: the 80-bit extended
//! format ([`F80`]), IEEE rounding with the x86 rounding modes and the
//! exception flags (MXCSR/FSW bit order: IE, DE, ZE, OE, UE, PE).
//!
//! SSE arithmetic is exact: multiplications and divisions multiply or
//! divide the significands as integers and round once; additions,
//! subtractions and square roots are computed on the host in f64 (which
//! must run in its default round-to-nearest mode) and the exact error of
//! the result is recovered with TwoSum / FMA, so directed rounding,
//! overflow, underflow and inexact follow from it (f32 operations done in
//! f64 and rounded once more are correctly rounded). x87 FADD/FSUB/FMUL/
//! FDIV work on the 80-bit significands as integers ([`f80_arith`]) and
//! round once to the precision control; x87 FSQRT goes through f64.

/// Exception flag bits (same positions in MXCSR and the x87 FSW).
pub const IE: u32 = 1;
pub const DE: u32 = 2;
pub const ZE: u32 = 4;
pub const OE: u32 = 8;
pub const UE: u32 = 16;
pub const PE: u32 = 32;

/// Rounding control: 0 nearest, 1 down, 2 up, 3 toward zero.
pub type Rc = u8;

/// An 80-bit extended-precision value: sign+exponent and the 64-bit
/// significand with its explicit integer bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct F80 {
    pub se: u16,
    pub m: u64,
}

impl F80 {
    pub const ZERO: F80 = F80 { se: 0, m: 0 };
    pub const ONE: F80 = F80 {
        se: 0x3fff,
        m: 1 << 63,
    };
    /// The QNaN "real indefinite".
    pub const INDEFINITE: F80 = F80 {
        se: 0xffff,
        m: 0xc000_0000_0000_0000,
    };

    pub fn from_bits(v: u128) -> F80 {
        F80 {
            se: (v >> 64) as u16,
            m: v as u64,
        }
    }
    pub fn bits(self) -> u128 {
        (u128::from(self.se) << 64) | u128::from(self.m)
    }
    pub fn sign(self) -> bool {
        self.se & 0x8000 != 0
    }
    pub fn exp(self) -> u16 {
        self.se & 0x7fff
    }
    pub fn is_nan(self) -> bool {
        self.exp() == 0x7fff && self.m << 1 != 0
    }
    pub fn is_snan(self) -> bool {
        self.is_nan() && self.m & (1 << 62) == 0
    }
    pub fn is_inf(self) -> bool {
        self.exp() == 0x7fff && self.m << 1 == 0
    }
    pub fn is_zero(self) -> bool {
        self.exp() == 0 && self.m == 0
    }
    pub fn is_denormal(self) -> bool {
        self.exp() == 0 && self.m != 0
    }
    pub fn quiet(self) -> F80 {
        F80 {
            se: self.se,
            m: self.m | (1 << 62),
        }
    }
    pub fn abs(self) -> F80 {
        F80 {
            se: self.se & 0x7fff,
            m: self.m,
        }
    }
    pub fn negate(self) -> F80 {
        F80 {
            se: self.se ^ 0x8000,
            m: self.m,
        }
    }

    /// Exact conversion from a double.
    pub fn from_f64(x: f64) -> F80 {
        let b = x.to_bits();
        let sign = ((b >> 63) as u16) << 15;
        let e = ((b >> 52) & 0x7ff) as i32;
        let f = b & ((1 << 52) - 1);
        if e == 0x7ff {
            return F80 {
                se: sign | 0x7fff,
                m: (1 << 63) | (f << 11),
            };
        }
        if e == 0 {
            if f == 0 {
                return F80 { se: sign, m: 0 };
            }
            let lz = f.leading_zeros() as i32;
            let m = f << lz;
            // value = f * 2^-1074 = (m / 2^63) * 2^(63 - 1074 - lz)
            let ue = 63 - 1074 - lz;
            return F80 {
                se: sign | (ue + 16383) as u16,
                m,
            };
        }
        F80 {
            se: sign | (e - 1023 + 16383) as u16,
            m: (1 << 63) | (f << 11),
        }
    }

    pub fn from_f32(x: f32) -> F80 {
        if x.is_nan() {
            // Keep the payload and the quiet bit (an f32 -> f64 cast may
            // quiet a signalling NaN).
            let b = x.to_bits();
            return F80 {
                se: (((b >> 31) as u16) << 15) | 0x7fff,
                m: (1 << 63) | (u64::from(b & 0x7f_ffff) << 40),
            };
        }
        F80::from_f64(f64::from(x))
    }

    /// Exact conversion from a signed integer.
    pub fn from_i64(v: i64) -> F80 {
        if v == 0 {
            return F80::ZERO;
        }
        let sign = if v < 0 { 0x8000 } else { 0 };
        let a = v.unsigned_abs();
        let lz = a.leading_zeros();
        F80 {
            se: sign | (63 - lz as u16 + 16383),
            m: a << lz,
        }
    }

    /// Unbiased exponent and normalised significand of a finite non-zero
    /// value (denormals and unnormals are normalised).
    fn normalised(self) -> (i32, u64) {
        let mut e = i32::from(self.exp()) - 16383;
        if self.exp() == 0 {
            e += 1;
        }
        let lz = self.m.leading_zeros() as i32;
        (e - lz, self.m << lz)
    }

    /// Round to a binary format with a `frac`-bit fraction and exponent
    /// bias `bias` (52/1023 for f64, 23/127 for f32). Returns the bits and
    /// the IE/OE/UE/PE flags (NaN inputs: quieted payload, IE if SNaN).
    pub fn to_binary(self, frac: u32, bias: i32, rc: Rc) -> (u64, u32) {
        let total = frac + 1 + exp_bits(bias);
        let sign = u64::from(self.sign()) << (total - 1);
        let all_ones = (1u64 << exp_bits(bias)) - 1;
        if self.is_nan() {
            let payload = (self.m << 1) >> (64 - frac);
            let q = 1u64 << (frac - 1);
            let flags = if self.is_snan() { IE } else { 0 };
            return (sign | (all_ones << frac) | payload | q, flags);
        }
        if self.exp() == 0x7fff {
            return (sign | (all_ones << frac), 0);
        }
        if self.m == 0 {
            return (sign, 0);
        }
        let (e, m) = self.normalised();
        let (bits, flags) = round_pack(self.sign(), e, m, 0, frac, bias, rc);
        (sign | bits, flags)
    }

    pub fn to_f64(self, rc: Rc) -> (f64, u32) {
        let (b, f) = self.to_binary(52, 1023, rc);
        (f64::from_bits(b), f)
    }

    /// Convert to a signed integer of `bits` bits with rounding `rc`
    /// (`None` = truncate). Out of range and NaN give the integer
    /// indefinite with IE.
    pub fn to_int(self, bits: u32, rc: Rc) -> (i64, u32) {
        let indefinite = (1u64 << (bits - 1)).wrapping_neg() as i64;
        let indefinite = if bits == 64 { i64::MIN } else { indefinite };
        if self.exp() == 0x7fff {
            return (indefinite, IE);
        }
        if self.m == 0 {
            return (0, 0);
        }
        let (e, m) = self.normalised();
        // value = m * 2^(e - 63)
        let (mag, inexact): (u128, bool) = if e >= 63 {
            if e > 64 {
                return (indefinite, IE);
            }
            (u128::from(m) << (e - 63), false)
        } else {
            let shift = (63 - e) as u32;
            let (kept, rem, half) = if shift >= 128 {
                (0u128, 1u128, 2u128)
            } else {
                let full = u128::from(m);
                let kept = full >> shift;
                let rem = full & ((1u128 << shift) - 1);
                (kept, rem, 1u128 << (shift - 1))
            };
            let up = rem != 0
                && match rc {
                    0 => rem > half || (rem == half && kept & 1 == 1),
                    1 => self.sign(),
                    2 => !self.sign(),
                    _ => false,
                };
            (kept + u128::from(up), rem != 0)
        };
        let limit = 1u128 << (bits - 1);
        let ok = if self.sign() {
            mag <= limit
        } else {
            mag < limit
        };
        if !ok {
            return (indefinite, IE);
        }
        let v = if self.sign() {
            (mag as i128).wrapping_neg() as i64
        } else {
            mag as i64
        };
        (v, if inexact { PE } else { 0 })
    }

    /// Exact comparison: None if unordered.
    pub fn compare(self, other: F80) -> Option<std::cmp::Ordering> {
        use std::cmp::Ordering;
        if self.is_nan() || other.is_nan() {
            return None;
        }
        let key = |v: F80| -> (bool, i32, u64) {
            if v.m == 0 && v.exp() != 0x7fff {
                (false, i32::MIN, 0)
            } else if v.exp() == 0x7fff {
                (v.sign(), i32::MAX, 0)
            } else {
                let (e, m) = v.normalised();
                (v.sign(), e, m)
            }
        };
        let (sa, ea, ma) = key(self);
        let (sb, eb, mb) = key(other);
        let mag = (ea, ma).cmp(&(eb, mb));
        let za = ea == i32::MIN;
        let zb = eb == i32::MIN;
        Some(match (za, zb) {
            (true, true) => Ordering::Equal,
            (true, false) => {
                if sb {
                    Ordering::Greater
                } else {
                    Ordering::Less
                }
            }
            (false, true) => {
                if sa {
                    Ordering::Less
                } else {
                    Ordering::Greater
                }
            }
            _ => match (sa, sb) {
                (false, false) => mag,
                (true, true) => mag.reverse(),
                (false, true) => Ordering::Greater,
                (true, false) => Ordering::Less,
            },
        })
    }
}

fn exp_bits(bias: i32) -> u32 {
    32 - (bias as u32).leading_zeros() + 1
}

/// Round `(-1)^sign * (m / 2^63) * 2^e` (m normalised) to a format with a
/// `frac`-bit fraction and bias `bias`. `extra` is the sign of a value
/// below the last bit of `m` that the true value differs by (0: exact).
/// Returns the magnitude bits and OE/UE/PE.
fn round_pack(sign: bool, e: i32, m: u64, extra: i8, frac: u32, bias: i32, rc: Rc) -> (u64, u32) {
    let max_biased = (1i32 << exp_bits(bias)) - 1;
    let biased = e + bias;
    let normal_shift = 63 - frac;
    let shift = if biased >= 1 {
        normal_shift
    } else {
        normal_shift + (1 - biased) as u32
    };
    let full = u128::from(m) << 64;
    let shift = shift + 64;
    let (mut kept, rem, half) = if shift > 128 {
        // Below half of the last place: only a sticky remainder.
        (0u128, 1u128, u128::MAX)
    } else if shift == 128 {
        (0u128, full, 1u128 << 127)
    } else {
        (
            full >> shift,
            full & ((1u128 << shift) - 1),
            1u128 << (shift - 1),
        )
    };
    // The magnitude is below `kept.rem` when extra has the value's opposite sign.
    let below = (extra < 0) != sign && extra != 0;
    let above = extra != 0 && !below;
    let inexact = rem != 0 || extra != 0;
    let up = inexact
        && match rc {
            0 => rem > half || (rem == half && (above || (!below && kept & 1 == 1))),
            1 => sign && !(rem == 0 && below),
            2 => !(sign || rem == 0 && below),
            _ => false,
        };
    // Truncating modes with an exact `kept` and a slightly smaller true
    // magnitude step one unit down.
    let down = rem == 0 && below && (rc == 3 || (rc == 1 && !sign) || (rc == 2 && sign));
    // Tininess after rounding with an unbounded exponent.
    let tiny = biased < 1 && {
        let nfull = u128::from(m) << 64;
        let ns = normal_shift + 64;
        let nk = nfull >> ns;
        let nrem = nfull & ((1u128 << ns) - 1);
        let nhalf = 1u128 << (ns - 1);
        let nup = match rc {
            0 => nrem > nhalf || (nrem == nhalf && (above || (!below && nk & 1 == 1))),
            1 => sign && (nrem != 0 || extra != 0),
            2 => !sign && (nrem != 0 || extra != 0),
            _ => false,
        };
        !(biased == 0 && nup && nk + 1 == 1u128 << (frac + 1))
    };
    if up {
        kept += 1;
    }
    if down {
        kept -= 1;
        if biased >= 1 && kept < 1u128 << frac {
            // Below a power of two the grid is finer: all ones one
            // exponent lower.
            let b = biased - 1;
            let bits = if b >= 1 {
                ((b as u64) << frac) | ((1u64 << frac) - 1)
            } else {
                (1u64 << frac) - 1
            };
            return (bits, PE);
        }
    }
    let mut flags = if inexact { PE } else { 0 };
    if tiny && inexact {
        flags |= UE;
    }
    let bits = if biased >= 1 {
        let mut b = biased;
        if kept == 1u128 << (frac + 1) {
            kept >>= 1;
            b += 1;
        }
        if b >= max_biased {
            let to_inf = match rc {
                0 => true,
                1 => sign,
                2 => !sign,
                _ => false,
            };
            let v = if to_inf {
                (max_biased as u64) << frac
            } else {
                ((max_biased as u64 - 1) << frac) | ((1u64 << frac) - 1)
            };
            return (v, OE | PE);
        }
        ((b as u64) << frac) | (kept as u64 & ((1u64 << frac) - 1))
    } else {
        kept as u64
    };
    (bits, flags)
}

/// A scalar SSE format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fmt {
    S,
    D,
}

impl Fmt {
    pub fn bytes(self) -> u32 {
        match self {
            Fmt::S => 4,
            Fmt::D => 8,
        }
    }
    fn frac(self) -> u32 {
        match self {
            Fmt::S => 23,
            Fmt::D => 52,
        }
    }
    fn bias(self) -> i32 {
        match self {
            Fmt::S => 127,
            Fmt::D => 1023,
        }
    }
    pub fn to_f64(self, v: u64) -> f64 {
        match self {
            Fmt::S => f64::from(f32::from_bits(v as u32)),
            Fmt::D => f64::from_bits(v),
        }
    }
    fn exp_field(self, v: u64) -> u64 {
        (v >> self.frac()) & ((1 << exp_bits(self.bias())) - 1)
    }
    fn frac_field(self, v: u64) -> u64 {
        v & ((1 << self.frac()) - 1)
    }
    pub fn is_nan(self, v: u64) -> bool {
        self.exp_field(v) == (1 << exp_bits(self.bias())) - 1 && self.frac_field(v) != 0
    }
    pub fn is_snan(self, v: u64) -> bool {
        self.is_nan(v) && v & (1 << (self.frac() - 1)) == 0
    }
    pub fn quiet(self, v: u64) -> u64 {
        v | (1 << (self.frac() - 1))
    }
    pub fn is_denormal(self, v: u64) -> bool {
        self.exp_field(v) == 0 && self.frac_field(v) != 0
    }
    fn sign_bit(self) -> u64 {
        1 << (self.bytes() * 8 - 1)
    }
    /// The QNaN indefinite.
    pub fn indefinite(self) -> u64 {
        match self {
            Fmt::S => 0xffc0_0000,
            Fmt::D => 0xfff8_0000_0000_0000,
        }
    }
    pub fn max_finite(self) -> u64 {
        match self {
            Fmt::S => f32::MAX.to_bits() as u64,
            Fmt::D => f64::MAX.to_bits(),
        }
    }
    /// Encode f64 `r` (true value `r` + something of sign `err`) in this
    /// format under `rc`. Returns bits and OE/UE/PE.
    fn encode(self, r: f64, err: f64, rc: Rc) -> (u64, u32) {
        if r.is_nan() {
            return (self.indefinite(), 0);
        }
        let extra = if err > 0.0 {
            1
        } else if err < 0.0 {
            -1
        } else {
            0
        };
        if r.is_infinite() {
            // Overflow of the f64 computation itself.
            let sign = r.is_sign_negative();
            let to_inf = match rc {
                0 => true,
                1 => sign,
                2 => !sign,
                _ => false,
            };
            let mag = if to_inf {
                match self {
                    Fmt::S => f32::INFINITY.to_bits() as u64,
                    Fmt::D => f64::INFINITY.to_bits(),
                }
            } else {
                self.max_finite()
            };
            let s = if sign { self.sign_bit() } else { 0 };
            return (s | mag, OE | PE);
        }
        if r == 0.0 {
            let s = if r.is_sign_negative() {
                self.sign_bit()
            } else {
                0
            };
            if extra == 0 {
                return (s, 0);
            }
            // A non-zero true value that rounded to zero in f64 (only for
            // f64 results of tiny products): let the integer path decide.
        }
        let f = F80::from_f64(r);
        if f.m == 0 {
            // Zero with a residual: smallest magnitude the mode allows.
            let neg = extra < 0;
            let s = if neg { self.sign_bit() } else { 0 };
            let away = match rc {
                1 => neg,
                2 => !neg,
                _ => false,
            };
            return (s | u64::from(away), UE | PE);
        }
        let (e, m) = f.normalised();
        let (bits, flags) = round_pack(f.sign(), e, m, extra, self.frac(), self.bias(), rc);
        let s = if f.sign() { self.sign_bit() } else { 0 };
        (s | bits, flags)
    }
}

/// Binary arithmetic operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Add,
    Sub,
    Mul,
    Div,
}

/// The MXCSR controls that matter to a computation.
#[derive(Debug, Clone, Copy)]
pub struct Ctl {
    pub rc: Rc,
    pub daz: bool,
    pub ftz: bool,
    /// Underflow masked (FTZ applies only then).
    pub um: bool,
}

impl Ctl {
    pub fn from_mxcsr(mx: u32) -> Ctl {
        Ctl {
            rc: ((mx >> 13) & 3) as u8,
            daz: mx & (1 << 6) != 0,
            ftz: mx & (1 << 15) != 0,
            um: mx & (1 << 11) != 0,
        }
    }
}

/// Denormal inputs: DE, or zero with DAZ.
fn input(f: Fmt, v: u64, ctl: Ctl, flags: &mut u32) -> u64 {
    if f.is_denormal(v) {
        if ctl.daz {
            return v & f.sign_bit();
        }
        *flags |= DE;
    }
    v
}

fn nan_result(f: Fmt, a: u64, b: u64) -> u64 {
    if f.is_nan(a) {
        f.quiet(a)
    } else {
        f.quiet(b)
    }
}

fn output(f: Fmt, bits: u64, mut flags: u32, ctl: Ctl) -> (u64, u32) {
    // FTZ (with underflow masked) flushes every tiny result, exact or not.
    if ctl.ftz && ctl.um && (flags & UE != 0 || f.is_denormal(bits)) {
        flags |= PE | UE;
        return (bits & f.sign_bit(), flags);
    }
    (bits, flags)
}

/// One scalar SSE arithmetic operation: result bits and flags.
pub fn arith(f: Fmt, op: Op, a: u64, b: u64, ctl: Ctl) -> (u64, u32) {
    let mut flags = 0;
    if f.is_nan(a) || f.is_nan(b) {
        if f.is_snan(a) || f.is_snan(b) {
            flags |= IE;
        }
        return (nan_result(f, a, b), flags);
    }
    let a = input(f, a, ctl, &mut flags);
    let b = input(f, b, ctl, &mut flags);
    let (x, y) = (f.to_f64(a), f.to_f64(b));
    let invalid = match op {
        Op::Add => x.is_infinite() && y.is_infinite() && (x > 0.0) != (y > 0.0),
        Op::Sub => x.is_infinite() && y.is_infinite() && (x > 0.0) == (y > 0.0),
        Op::Mul => (x.is_infinite() && y == 0.0) || (x == 0.0 && y.is_infinite()),
        Op::Div => (x == 0.0 && y == 0.0) || (x.is_infinite() && y.is_infinite()),
    };
    if invalid {
        return (f.indefinite(), flags | IE);
    }
    if op == Op::Div && y == 0.0 && x.is_finite() {
        flags |= ZE;
        flags &= !DE;
        let neg = x.is_sign_negative() != y.is_sign_negative();
        let inf = match f {
            Fmt::S => f32::INFINITY.to_bits() as u64,
            Fmt::D => f64::INFINITY.to_bits(),
        };
        return (inf | if neg { f.sign_bit() } else { 0 }, flags);
    }
    if matches!(op, Op::Mul | Op::Div) && x != 0.0 && y != 0.0 && x.is_finite() && y.is_finite() {
        let (bits, fl) = exact_muldiv(f, op == Op::Mul, x, y, ctl.rc);
        return output(f, bits, flags | fl, ctl);
    }
    let (r, err) = match op {
        Op::Add => two_sum(x, y),
        Op::Sub => two_sum(x, -y),
        Op::Mul => {
            let p = x * y;
            (p, x.mul_add(y, -p))
        }
        Op::Div => {
            let q = x / y;
            // x - q*y has the sign of the true quotient's excess over q
            // times the sign of y.
            let rem = (-q).mul_add(y, x);
            (q, if y < 0.0 { -rem } else { rem })
        }
    };
    let exact_zero = r == 0.0 && (err == 0.0 || err.is_nan());
    if exact_zero {
        // Exact zero results: sign per IEEE (x - x = +0, -0 in RD).
        let neg = match op {
            Op::Add | Op::Sub => {
                let y2 = if op == Op::Sub { -y } else { y };
                if x == 0.0 && y2 == 0.0 {
                    if x.is_sign_negative() == y2.is_sign_negative() {
                        x.is_sign_negative()
                    } else {
                        ctl.rc == 1
                    }
                } else {
                    ctl.rc == 1
                }
            }
            _ => r.is_sign_negative(),
        };
        return (if neg { f.sign_bit() } else { 0 }, flags);
    }
    let infinite_in = x.is_infinite() || y.is_infinite();
    if infinite_in {
        let (bits, _) = f.encode(r, 0.0, ctl.rc);
        return (bits, flags);
    }
    let err = if err.is_nan() { 0.0 } else { err };
    let (bits, fl) = f.encode(r, err, ctl.rc);
    output(f, bits, flags | fl, ctl)
}

/// Multiply or divide two finite non-zero values exactly in integers and
/// round once to `f`.
fn exact_muldiv(f: Fmt, mul: bool, x: f64, y: f64, rc: Rc) -> (u64, u32) {
    let (a, b) = (F80::from_f64(x), F80::from_f64(y));
    let sign = a.sign() != b.sign();
    let (ea, ma) = a.normalised();
    let (eb, mb) = b.normalised();
    let (e, m, sticky) = if mul {
        // (ma/2^63)(mb/2^63) = p/2^126, p in [2^126, 2^128).
        let p = u128::from(ma) * u128::from(mb);
        if p >> 127 != 0 {
            (ea + eb + 1, (p >> 64) as u64, p as u64 != 0)
        } else {
            (ea + eb, (p >> 63) as u64, (p as u64) << 1 != 0)
        }
    } else {
        // (ma << 64) / mb = q / 2^64 * 2^63-ish: q in (2^63, 2^65).
        let n = u128::from(ma) << 64;
        let q = n / u128::from(mb);
        let r = n % u128::from(mb);
        if q >> 64 != 0 {
            (ea - eb, (q >> 1) as u64, q & 1 != 0 || r != 0)
        } else {
            (ea - eb - 1, q as u64, r != 0)
        }
    };
    let extra = if !sticky {
        0
    } else if sign {
        -1
    } else {
        1
    };
    let (bits, flags) = round_pack(sign, e, m, extra, f.frac(), f.bias(), rc);
    (if sign { f.sign_bit() } else { 0 } | bits, flags)
}

fn two_sum(a: f64, b: f64) -> (f64, f64) {
    let s = a + b;
    if s.is_infinite() {
        return (s, 0.0);
    }
    let bb = s - a;
    let err = (a - (s - bb)) + (b - bb);
    (s, err)
}

/// Square root.
pub fn sqrt(f: Fmt, a: u64, ctl: Ctl) -> (u64, u32) {
    let mut flags = 0;
    if f.is_nan(a) {
        return (f.quiet(a), if f.is_snan(a) { IE } else { 0 });
    }
    let a = input(f, a, ctl, &mut flags);
    let x = f.to_f64(a);
    if x == 0.0 {
        return (a, flags);
    }
    if x < 0.0 {
        return (f.indefinite(), IE);
    }
    if x.is_infinite() {
        return (a, flags);
    }
    // Tiny inputs are scaled by an even power of two so that the FMA
    // residual stays representable; the scaling back is exact.
    let tiny = x < 2f64.powi(-900);
    let xs = if tiny { x * 2f64.powi(200) } else { x };
    let s = xs.sqrt();
    let err = -(s.mul_add(s, -xs));
    let s = if tiny { s * 2f64.powi(-100) } else { s };
    let (bits, fl) = f.encode(s, err, ctl.rc);
    output(f, bits, flags | fl, ctl)
}

/// MINSS/MINSD (`max` false) and MAXSS/MAXSD: NaN or equal operands
/// return the second (source) operand.
pub fn minmax(f: Fmt, max: bool, a: u64, b: u64, ctl: Ctl) -> (u64, u32) {
    let mut flags = 0;
    if f.is_nan(a) || f.is_nan(b) {
        // The source is returned, as DAZ sees it.
        let mut ignore = 0;
        return (input(f, b, ctl, &mut ignore), IE);
    }
    let a2 = input(f, a, ctl, &mut flags);
    let b2 = input(f, b, ctl, &mut flags);
    let (x, y) = (f.to_f64(a2), f.to_f64(b2));
    let pick_a = if max { x > y } else { x < y };
    (if pick_a { a2 } else { b2 }, flags)
}

/// CMPSS/CMPSD/CMPPS/CMPPD predicate 0-7: mask result and flags.
pub fn cmp(f: Fmt, pred: u8, a: u64, b: u64, ctl: Ctl) -> (bool, u32) {
    let mut flags = 0;
    let unord = f.is_nan(a) || f.is_nan(b);
    let signalling = matches!(pred & 7, 1 | 2 | 5 | 6);
    if f.is_snan(a) || f.is_snan(b) || (unord && signalling) {
        flags |= IE;
    }
    let a2 = input(f, a, ctl, &mut flags);
    let b2 = input(f, b, ctl, &mut flags);
    if unord {
        flags &= !DE;
    }
    let (x, y) = (f.to_f64(a2), f.to_f64(b2));
    let r = match pred & 7 {
        0 => !unord && x == y,
        1 => !unord && x < y,
        2 => !unord && x <= y,
        3 => unord,
        4 => unord || x != y,
        5 => unord || x >= y,
        6 => unord || x > y,
        _ => !unord,
    };
    (r, flags)
}

/// UCOMIS*/COMIS*: (ZF, PF, CF) and flags.
pub fn comi(f: Fmt, signalling: bool, a: u64, b: u64, ctl: Ctl) -> ((bool, bool, bool), u32) {
    let mut flags = 0;
    let unord = f.is_nan(a) || f.is_nan(b);
    if f.is_snan(a) || f.is_snan(b) || (unord && signalling) {
        flags |= IE;
    }
    let a2 = input(f, a, ctl, &mut flags);
    let b2 = input(f, b, ctl, &mut flags);
    if unord {
        return ((true, true, true), flags & !DE);
    }
    let (x, y) = (f.to_f64(a2), f.to_f64(b2));
    let r = if x == y {
        (true, false, false)
    } else if x < y {
        (false, false, true)
    } else {
        (false, false, false)
    };
    (r, flags)
}

/// Float to float conversion (CVTSS2SD / CVTSD2SS and packed forms).
pub fn convert(from: Fmt, to: Fmt, a: u64, ctl: Ctl) -> (u64, u32) {
    let mut flags = 0;
    if from.is_nan(a) {
        let f80 = match from {
            Fmt::S => F80::from_f32(f32::from_bits(a as u32)),
            Fmt::D => F80::from_f64(f64::from_bits(a)),
        };
        let (bits, fl) = f80.to_binary(to.frac(), to.bias(), 0);
        return (bits, fl);
    }
    let a = input(from, a, ctl, &mut flags);
    let x = from.to_f64(a);
    if x.is_infinite() || x == 0.0 {
        let sign = if x.is_sign_negative() {
            to.sign_bit()
        } else {
            0
        };
        let mag = if x.is_infinite() {
            match to {
                Fmt::S => f32::INFINITY.to_bits() as u64,
                Fmt::D => f64::INFINITY.to_bits(),
            }
        } else {
            0
        };
        return (sign | mag, flags);
    }
    let (bits, fl) = to.encode(x, 0.0, ctl.rc);
    output(to, bits, flags | fl, ctl)
}

/// Float to signed integer (`bits` 32 or 64), `truncate` for CVTT*.
pub fn to_int(f: Fmt, a: u64, bits: u32, truncate: bool, ctl: Ctl) -> (i64, u32) {
    let mut flags = 0;
    let a = input(f, a, ctl, &mut flags);
    // Conversions to integers do not report denormal operands.
    flags &= !DE;
    let v = match f {
        Fmt::S => F80::from_f32(f32::from_bits(a as u32)),
        Fmt::D => F80::from_f64(f64::from_bits(a)),
    };
    let (r, fl) = v.to_int(bits, if truncate { 3 } else { ctl.rc });
    (r, flags | fl)
}

/// Signed integer to float.
pub fn from_int(f: Fmt, v: i64, ctl: Ctl) -> (u64, u32) {
    if v == 0 {
        return (0, 0);
    }
    let x = F80::from_i64(v);
    x.to_binary(f.frac(), f.bias(), ctl.rc)
}

/// x87 arithmetic on two finite [`F80`] values, exact and rounded once
/// to `pbits` (24, 53 or 64) bits of precision with an extended exponent.
/// NaNs, infinities and invalid operations are the caller's. Returns the
/// result and ZE/OE/UE/PE.
pub fn f80_arith(op: Op, a: F80, b: F80, pbits: u32, rc: Rc) -> (F80, u32) {
    let (sa, sb) = (a.sign(), b.sign());
    match op {
        Op::Add | Op::Sub => {
            let sb = if op == Op::Sub { !sb } else { sb };
            if a.m == 0 && b.m == 0 {
                let neg = if sa == sb { sa } else { rc == 1 };
                return (
                    F80 {
                        se: u16::from(neg) << 15,
                        m: 0,
                    },
                    0,
                );
            }
            if a.m == 0 || b.m == 0 {
                let (s, v) = if a.m == 0 { (sb, b) } else { (sa, a) };
                let (e, m) = v.normalised();
                return f80_round(s, e, u128::from(m) << 64, false, pbits, rc);
            }
            let (ea, ma) = a.normalised();
            let (eb, mb) = b.normalised();
            // Value = M / 2^127 * 2^E with 64 guard bits below the
            // significand; bits shifted out are jammed into bit 0.
            let (big, small, sbig, ssmall) = if (ea, ma) >= (eb, mb) {
                (
                    (ea, u128::from(ma) << 64),
                    (eb, u128::from(mb) << 64),
                    sa,
                    sb,
                )
            } else {
                (
                    (eb, u128::from(mb) << 64),
                    (ea, u128::from(ma) << 64),
                    sb,
                    sa,
                )
            };
            let d = (big.0 - small.0) as u32;
            let small_m = if d >= 128 {
                1
            } else if d == 0 {
                small.1
            } else {
                (small.1 >> d) | u128::from(small.1 & ((1u128 << d) - 1) != 0)
            };
            let mut e = big.0;
            let r = if sbig == ssmall {
                let (sum, carry) = big.1.overflowing_add(small_m);
                if carry {
                    e += 1;
                    (sum >> 1) | (1u128 << 127) | (sum & 1)
                } else {
                    sum
                }
            } else {
                big.1 - small_m
            };
            if r == 0 {
                return (
                    F80 {
                        se: u16::from(rc == 1) << 15,
                        m: 0,
                    },
                    0,
                );
            }
            let lz = r.leading_zeros();
            f80_round(sbig, e - lz as i32, r << lz, false, pbits, rc)
        }
        Op::Mul | Op::Div => {
            let sign = sa != sb;
            if op == Op::Div && b.m == 0 {
                return (
                    F80 {
                        se: (u16::from(sign) << 15) | 0x7fff,
                        m: 1 << 63,
                    },
                    ZE,
                );
            }
            if a.m == 0 || b.m == 0 {
                return (
                    F80 {
                        se: u16::from(sign) << 15,
                        m: 0,
                    },
                    0,
                );
            }
            let (ea, ma) = a.normalised();
            let (eb, mb) = b.normalised();
            if op == Op::Mul {
                // (ma/2^63)(mb/2^63) = p/2^126, p in [2^126, 2^128).
                let p = u128::from(ma) * u128::from(mb);
                if p >> 127 != 0 {
                    f80_round(sign, ea + eb + 1, p, false, pbits, rc)
                } else {
                    f80_round(sign, ea + eb, p << 1, false, pbits, rc)
                }
            } else {
                // 64 + 63 quotient bits: (ma << 63 << 64) does not fit, so
                // divide in two steps.
                let n = u128::from(ma) << 64;
                let mb = u128::from(mb);
                let q1 = n / mb; // in (2^63, 2^65)
                let r1 = n % mb;
                let q2 = (r1 << 62) / mb; // the next 62 bits
                let r2 = (r1 << 62) % mb;
                let q = (q1 << 62) | q2; // in (2^125, 2^127)
                let lz = q.leading_zeros();
                // value = q / 2^126 * 2^(ea - eb)
                f80_round(sign, ea - eb + 1 - lz as i32, q << lz, r2 != 0, pbits, rc)
            }
        }
    }
}

/// Round `(-1)^sign * m/2^127 * 2^e` (m normalised, `sticky` when the
/// true magnitude is slightly above) to `pbits` bits in the 80-bit format.
pub fn f80_round(sign: bool, e: i32, m: u128, sticky: bool, pbits: u32, rc: Rc) -> (F80, u32) {
    let pbits = pbits.clamp(1, 64);
    let shift = 128 - pbits;
    let kept = m >> shift;
    let rem = ((m & ((1u128 << shift) - 1)) << 1) | u128::from(sticky);
    let half = 1u128 << shift;
    let inexact = rem != 0;
    let up = inexact
        && match rc {
            0 => rem > half || (rem == half && kept & 1 == 1),
            1 => sign,
            2 => !sign,
            _ => false,
        };
    let mut kept = kept;
    let mut e = e;
    if up {
        kept += 1;
        if kept >> pbits != 0 {
            kept >>= 1;
            e += 1;
        }
    }
    let flags = if inexact { PE } else { 0 };
    let biased = e + 16383;
    let s = u16::from(sign) << 15;
    let mshift = 64 - pbits;
    if biased >= 0x7fff {
        let to_inf = match rc {
            0 => true,
            1 => sign,
            2 => !sign,
            _ => false,
        };
        return if to_inf {
            (
                F80 {
                    se: s | 0x7fff,
                    m: 1 << 63,
                },
                OE | PE,
            )
        } else {
            (
                F80 {
                    se: s | 0x7ffe,
                    m: u64::MAX << mshift,
                },
                OE | PE,
            )
        };
    }
    let m = (kept as u64) << mshift;
    if biased <= 0 {
        // Denormal result (truncated, not re-rounded, at the denormal
        // position).
        let d = (1 - biased) as u32;
        let m2 = if d >= 64 { 0 } else { m >> d };
        let lost = d >= 64 || m & ((1u64 << d) - 1) != 0;
        let fl = flags | if inexact || lost { UE | PE } else { 0 };
        return (F80 { se: s, m: m2 }, fl);
    }
    (
        F80 {
            se: s | biased as u16,
            m,
        },
        flags,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const RN: Ctl = Ctl {
        rc: 0,
        daz: false,
        ftz: false,
        um: true,
    };

    #[test]
    fn f80_round_trips_doubles() {
        for x in [
            0.0,
            -0.0,
            1.0,
            -2.5,
            f64::MAX,
            f64::MIN_POSITIVE,
            5e-324,
            -1e-310,
            f64::INFINITY,
            123456.789,
        ] {
            let f = F80::from_f64(x);
            assert_eq!(f.to_f64(0).0.to_bits(), x.to_bits(), "{x}");
        }
        assert_eq!(F80::from_f64(1.0), F80::ONE);
        assert_eq!(F80::from_i64(1), F80::ONE);
        assert_eq!(F80::from_i64(-3).to_f64(0).0, -3.0);
        assert_eq!(F80::from_i64(i64::MIN).to_int(64, 0), (i64::MIN, 0));
        assert_eq!(F80::from_f64(2.5).to_int(32, 0), (2, PE));
        assert_eq!(F80::from_f64(3.5).to_int(32, 0), (4, PE));
        assert_eq!(F80::from_f64(-2.5).to_int(32, 1), (-3, PE));
        assert_eq!(F80::from_f64(3e9).to_int(32, 0), (i32::MIN as i64, IE));
    }

    #[test]
    fn f80_compare_is_exact() {
        let a = F80::ONE;
        let b = F80 {
            se: 0x3fff,
            m: (1 << 63) | 1,
        };
        assert_eq!(a.compare(b), Some(std::cmp::Ordering::Less));
        assert_eq!(
            b.negate().compare(a.negate()),
            Some(std::cmp::Ordering::Less)
        );
        assert_eq!(
            F80::ZERO.compare(F80::ZERO.negate()),
            Some(std::cmp::Ordering::Equal)
        );
        assert_eq!(F80::INDEFINITE.compare(a), None);
    }

    #[test]
    fn sse_arith_flags() {
        let d = |x: f64| x.to_bits();
        assert_eq!(arith(Fmt::D, Op::Add, d(1.0), d(2.0), RN), (d(3.0), 0));
        assert_eq!(arith(Fmt::D, Op::Div, d(1.0), d(3.0), RN).1, PE);
        assert_eq!(arith(Fmt::D, Op::Div, d(1.0), d(0.0), RN).1, ZE);
        assert_eq!(
            arith(Fmt::D, Op::Mul, d(f64::MAX), d(2.0), RN),
            (d(f64::INFINITY), OE | PE)
        );
        let down = Ctl { rc: 1, ..RN };
        assert_eq!(
            arith(Fmt::D, Op::Div, d(1.0), d(3.0), down).0,
            (1.0f64 / 3.0).to_bits()
        );
        let up = Ctl { rc: 2, ..RN };
        assert_eq!(
            arith(Fmt::D, Op::Div, d(1.0), d(3.0), up).0,
            (1.0f64 / 3.0).next_up().to_bits()
        );
        let s = |x: f32| u64::from(x.to_bits());
        assert_eq!(arith(Fmt::S, Op::Add, s(1.0), s(2.0), RN), (s(3.0), 0));
        assert_eq!(
            arith(Fmt::S, Op::Div, s(1.0), s(3.0), RN),
            (s(1.0 / 3.0), PE)
        );
        assert_eq!(convert(Fmt::D, Fmt::S, d(0.1), RN), (s(0.1), PE));
        assert_eq!(to_int(Fmt::D, d(-1.5), 32, true, RN), (-1, PE));
        assert_eq!(from_int(Fmt::S, 16_777_217, RN), (s(16_777_216.0), PE));
    }
}
