//! Compiling a kind's table (and the policy's extra rules) to BPF.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::tables::{Allow, Args};
use super::{DropTo, OnViolation, Policy, SeccompError, ThreadKind};

/// Compile `kind`'s table to BPF.
pub fn compile(kind: ThreadKind, on_violation: OnViolation) -> Result<BpfProgram, SeccompError> {
    compile_with(
        kind,
        &Policy {
            on_violation,
            drop_to: None,
        },
    )
}

/// The calls that drop a thread to `ids` (see [`Policy::drop_to`]).
fn drop_rules(ids: DropTo) -> Result<Vec<(i64, SeccompRule)>, seccompiler::BackendError> {
    let eq =
        |arg: u8, v: u64| SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v);
    let all3 = |v: u32| -> Result<SeccompRule, seccompiler::BackendError> {
        SeccompRule::new(vec![eq(0, v.into())?, eq(1, v.into())?, eq(2, v.into())?])
    };
    Ok(vec![
        (libc::SYS_setgroups, SeccompRule::new(vec![eq(0, 0)?])?),
        (libc::SYS_setresgid, all3(ids.gid)?),
        (libc::SYS_setresuid, all3(ids.uid)?),
    ])
}

/// Compile `kind`'s table to BPF under `policy`.
pub fn compile_with(kind: ThreadKind, policy: &Policy) -> Result<BpfProgram, SeccompError> {
    compile_extra(kind, policy, Vec::new())
}

/// The jail supervisor's filter: [`ThreadKind::Supervisor`]'s table plus
/// `kill` of its one child (the VMM) and nothing else.
pub fn compile_supervisor(child: libc::pid_t) -> Result<BpfProgram, SeccompError> {
    let kind = ThreadKind::Supervisor;
    let pid = u64::try_from(child).map_err(|_| SeccompError::Compile {
        kind,
        why: format!("not a child's pid: {child}"),
    })?;
    let rule = SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, pid)
        .and_then(|c| SeccompRule::new(vec![c]))
        .map_err(|e| SeccompError::Compile {
            kind,
            why: format!("kill: {e}"),
        })?;
    compile_extra(
        kind,
        &Policy {
            on_violation: OnViolation::KillProcess,
            drop_to: None,
        },
        vec![(libc::SYS_kill, rule)],
    )
}

fn compile_extra(
    kind: ThreadKind,
    policy: &Policy,
    extra: Vec<(i64, SeccompRule)>,
) -> Result<BpfProgram, SeccompError> {
    let on_violation = policy.on_violation;
    let err = |why: String| SeccompError::Compile { kind, why };
    let mut rules: BTreeMap<i64, Option<Vec<SeccompRule>>> = BTreeMap::new();
    for (nr, rule) in extra {
        if let Some(v) = rules.entry(nr).or_insert_with(|| Some(Vec::new())) {
            v.push(rule);
        }
    }
    if let Some(ids) = policy.drop_to {
        if ids.uid == 0 || ids.gid == 0 {
            return Err(err("the jail's ids must not be root's".into()));
        }
        for (nr, rule) in drop_rules(ids).map_err(|e| err(format!("privilege drop: {e}")))? {
            if let Some(v) = rules.entry(nr).or_insert_with(|| Some(Vec::new())) {
                v.push(rule);
            }
        }
    }
    for allow in kind.allowed() {
        let new = rules_for(&allow).map_err(|e| err(format!("{}: {e}", allow.name)))?;
        let entry = rules.entry(allow.nr).or_insert_with(|| Some(Vec::new()));
        match (entry.as_mut(), new) {
            // Unconditional somewhere: unconditional.
            (_, None) => *entry = None,
            (None, Some(_)) => {}
            (Some(existing), Some(more)) => existing.extend(more),
        }
    }
    let rules = rules
        .into_iter()
        .map(|(nr, r)| (nr, r.unwrap_or_default()))
        .collect();
    let mismatch = match on_violation {
        OnViolation::KillProcess => SeccompAction::KillProcess,
        OnViolation::Log => SeccompAction::Log,
    };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| err(e.to_string()))?;
    BpfProgram::try_from(filter).map_err(|e| err(e.to_string()))
}

/// The rules (OR'ed) of one table entry; `None` for "any arguments".
fn rules_for(allow: &Allow) -> Result<Option<Vec<SeccompRule>>, seccompiler::BackendError> {
    let cond = |arg: u8, len: SeccompCmpArgLen, op: SeccompCmpOp, v: u64| {
        SeccompCondition::new(arg, len, op, v)
    };
    Ok(match allow.args {
        Args::Any => None,
        Args::Ioctl(reqs) => Some(
            reqs.iter()
                .map(|r| {
                    SeccompRule::new(vec![cond(
                        1,
                        SeccompCmpArgLen::Dword,
                        SeccompCmpOp::Eq,
                        r.0,
                    )?])
                })
                .collect::<Result<_, _>>()?,
        ),
        Args::OneOf { arg, values } => Some(
            values
                .iter()
                .map(|&v| {
                    SeccompRule::new(vec![cond(
                        arg,
                        SeccompCmpArgLen::Dword,
                        SeccompCmpOp::Eq,
                        v,
                    )?])
                })
                .collect::<Result<_, _>>()?,
        ),
        Args::NoExec => Some(vec![SeccompRule::new(vec![cond(
            2,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
            0,
        )?])?]),
        Args::ThreadOnly => Some(vec![SeccompRule::new(vec![cond(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
            libc::CLONE_THREAD as u64,
        )?])?]),
    })
}
