//! Conversions between KVM's structures and the backend-neutral ones.

use kvm_bindings::{kvm_cpuid_entry2, kvm_dtable, kvm_regs, kvm_segment, kvm_sregs};

use crate::{CpuidEntry, Regs, Segment, SpecialRegs, TableRegister};

pub fn regs_from_kvm(r: &kvm_regs) -> Regs {
    Regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

pub fn regs_to_kvm(r: &Regs) -> kvm_regs {
    kvm_regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

fn segment_from_kvm(s: &kvm_segment) -> Segment {
    Segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        s: s.s,
        dpl: s.dpl,
        present: s.present,
        avl: s.avl,
        l: s.l,
        db: s.db,
        g: s.g,
        unusable: s.unusable,
    }
}

fn segment_to_kvm(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present,
        dpl: s.dpl,
        db: s.db,
        s: s.s,
        l: s.l,
        g: s.g,
        avl: s.avl,
        unusable: s.unusable,
        padding: 0,
    }
}

fn table_from_kvm(t: &kvm_dtable) -> TableRegister {
    TableRegister {
        base: t.base,
        limit: t.limit,
    }
}

fn table_to_kvm(t: &TableRegister) -> kvm_dtable {
    kvm_dtable {
        base: t.base,
        limit: t.limit,
        padding: [0; 3],
    }
}

pub fn sregs_from_kvm(s: &kvm_sregs) -> SpecialRegs {
    SpecialRegs {
        cs: segment_from_kvm(&s.cs),
        ds: segment_from_kvm(&s.ds),
        es: segment_from_kvm(&s.es),
        fs: segment_from_kvm(&s.fs),
        gs: segment_from_kvm(&s.gs),
        ss: segment_from_kvm(&s.ss),
        tr: segment_from_kvm(&s.tr),
        ldt: segment_from_kvm(&s.ldt),
        gdt: table_from_kvm(&s.gdt),
        idt: table_from_kvm(&s.idt),
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        cr8: s.cr8,
        efer: s.efer,
        apic_base: s.apic_base,
    }
}

pub fn sregs_to_kvm(src: &SpecialRegs, s: &mut kvm_sregs) {
    s.cs = segment_to_kvm(&src.cs);
    s.ds = segment_to_kvm(&src.ds);
    s.es = segment_to_kvm(&src.es);
    s.fs = segment_to_kvm(&src.fs);
    s.gs = segment_to_kvm(&src.gs);
    s.ss = segment_to_kvm(&src.ss);
    s.tr = segment_to_kvm(&src.tr);
    s.ldt = segment_to_kvm(&src.ldt);
    s.gdt = table_to_kvm(&src.gdt);
    s.idt = table_to_kvm(&src.idt);
    s.cr0 = src.cr0;
    s.cr2 = src.cr2;
    s.cr3 = src.cr3;
    s.cr4 = src.cr4;
    s.cr8 = src.cr8;
    s.efer = src.efer;
    s.apic_base = src.apic_base;
}

pub fn cpuid_from_kvm(e: &kvm_cpuid_entry2) -> CpuidEntry {
    CpuidEntry {
        function: e.function,
        index: e.index,
        flags: e.flags,
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
    }
}

pub fn cpuid_to_kvm(e: &CpuidEntry) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function: e.function,
        index: e.index,
        flags: e.flags,
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
        ..Default::default()
    }
}
