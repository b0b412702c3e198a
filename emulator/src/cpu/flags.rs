//! Arithmetic flag computation, eagerly after every instruction.
//!
//! Every function takes the operand width in bits (8, 16, 32 or 64) and
//! returns the new values of the flags it defines as RFLAGS bits; the caller
//! merges them with [`super::state::CpuState::set_arith`]. Lazy flags are a
//! later optimisation.

use super::state::rflags::{AF, CF, OF, PF, SF, ZF};

/// All-ones mask for `bits`.
pub fn mask(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// The sign bit for `bits`.
pub fn sign_bit(bits: u32) -> u64 {
    1u64.checked_shl(bits.wrapping_sub(1)).unwrap_or(0)
}

/// Sign-extend the low `bits` of `v` to 64 bits.
pub fn sext(bits: u32, v: u64) -> u64 {
    if bits >= 64 || bits == 0 {
        v
    } else {
        let shift = 64 - bits;
        (((v << shift) as i64) >> shift) as u64
    }
}

/// PF: set when the low byte has an even number of ones.
pub fn parity(v: u64) -> u64 {
    if (v as u8).count_ones() % 2 == 0 {
        PF
    } else {
        0
    }
}

/// SF, ZF and PF of a result.
pub fn szp(bits: u32, r: u64) -> u64 {
    let r = r & mask(bits);
    let mut f = parity(r);
    if r == 0 {
        f |= ZF;
    }
    if r & sign_bit(bits) != 0 {
        f |= SF;
    }
    f
}

/// `a + b + carry`: result and all six arithmetic flags.
pub fn add(bits: u32, a: u64, b: u64, carry: bool) -> (u64, u64) {
    let m = mask(bits);
    let (a, b) = (a & m, b & m);
    let wide = a as u128 + b as u128 + carry as u128;
    let r = (wide as u64) & m;
    let mut f = szp(bits, r);
    if wide > m as u128 {
        f |= CF;
    }
    if (a ^ r) & (b ^ r) & sign_bit(bits) != 0 {
        f |= OF;
    }
    f |= (a ^ b ^ r) & AF;
    (r, f)
}

/// `a - b - borrow`: result and all six arithmetic flags.
pub fn sub(bits: u32, a: u64, b: u64, borrow: bool) -> (u64, u64) {
    let m = mask(bits);
    let (a, b) = (a & m, b & m);
    let r = a.wrapping_sub(b).wrapping_sub(borrow as u64) & m;
    let mut f = szp(bits, r);
    if (a as u128) < b as u128 + borrow as u128 {
        f |= CF;
    }
    if (a ^ b) & (a ^ r) & sign_bit(bits) != 0 {
        f |= OF;
    }
    f |= (a ^ b ^ r) & AF;
    (r, f)
}

/// Flags after AND/OR/XOR/TEST: CF and OF cleared, AF cleared (undefined
/// architecturally; hardware clears it).
pub fn logic(bits: u32, r: u64) -> u64 {
    szp(bits, r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_carry_and_overflow() {
        let (r, f) = add(8, 0x7f, 1, false);
        assert_eq!(r, 0x80);
        assert_eq!(f & (OF | SF | CF | AF), OF | SF | AF);
        let (r, f) = add(8, 0xff, 1, false);
        assert_eq!(r, 0);
        assert_eq!(f & (CF | ZF | OF), CF | ZF);
        let (r, f) = add(64, u64::MAX, 0, true);
        assert_eq!(r, 0);
        assert_ne!(f & CF, 0);
    }

    #[test]
    fn sub_borrow() {
        let (r, f) = sub(16, 0, 1, false);
        assert_eq!(r, 0xffff);
        assert_eq!(f & (CF | SF | OF), CF | SF);
        let (r, f) = sub(32, 0x8000_0000, 1, false);
        assert_eq!(r, 0x7fff_ffff);
        assert_eq!(f & (CF | OF), OF);
        let (_, f) = sub(64, 5, 5, true);
        assert_ne!(f & CF, 0);
    }

    #[test]
    fn sign_extension() {
        assert_eq!(sext(8, 0x80), 0xffff_ffff_ffff_ff80);
        assert_eq!(sext(32, 0x7fff_ffff), 0x7fff_ffff);
        assert_eq!(parity(0b11), PF);
    }
}
