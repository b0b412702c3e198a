//! Instruction semantics, grouped by kind; how an instruction's handler is
//! chosen (`dispatch`) and the operand access helpers every group shares
//! (`operand`).

pub mod alu;
pub mod bits;
pub mod branch;
pub mod fast;
pub mod float;
pub mod mov;
pub mod muldiv;
pub mod shift;
pub mod sse;
pub mod stack;
pub mod string;
pub mod system;
pub mod x87;

pub(crate) mod dispatch;
pub(crate) mod operand;
