//! The string schemas the OpenAPI document names (VM names, snapshot tags,
//! the device option strings), and the field schemas that refer to them
//! (`#[schema(schema_with = ...)]`): the Rust fields are plain strings, the
//! document says what they hold.

use utoipa::openapi::schema::{
    ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, SchemaType, Type,
};
use utoipa::openapi::{Ref, RefOr};

/// The named schemas, for the document's components.
pub fn components() -> Vec<(&'static str, RefOr<Schema>)> {
    let string = || ObjectBuilder::new().schema_type(Type::String);
    let option = |description: &str, example: &str| {
        string()
            .description(Some(description))
            .examples([example])
            .build()
            .into()
    };
    vec![
        (
            "VmName",
            string()
                .pattern(Some(format!(
                    "^[A-Za-z0-9][A-Za-z0-9._-]{{0,{}}}$",
                    super::MAX_NAME - 1
                )))
                .min_length(Some(1))
                .max_length(Some(super::MAX_NAME))
                .build()
                .into(),
        ),
        (
            "SnapshotTag",
            string()
                .pattern(Some(format!("^[A-Za-z0-9._-]{{1,{}}}$", super::MAX_TAG)))
                .min_length(Some(1))
                .max_length(Some(super::MAX_TAG))
                .build()
                .into(),
        ),
        (
            "DiskOptions",
            option(
                "The value of `vireo run --disk`: `path=/abs/disk.qcow2[,readonly=on][,id=ID][,serial=S][,format=raw|qcow2][,bw=10M][,ops=1000]` (a bare first word is the path). The path is absolute and must exist; an image may appear once per VM.",
                "path=/srv/vm/root.qcow2,id=root,bw=100M",
            ),
        ),
        (
            "NetOptions",
            option(
                "The value of `vireo run --net`: `tap=NAME[,mac=52:54:00:12:34:56][,id=ID][,mtu=N][,bw=100M][,ops=20000]` (a bare first word is the TAP). Without `mac=` the daemon appends a random one when it stores the definition, so the guest keeps its address across restarts. A TAP may appear once per VM.",
                "tap=tap0",
            ),
        ),
        (
            "VsockOptions",
            option(
                "The value of `vireo run --vsock`: `cid=N,socket=/abs/path` (N from 3 to 4294967294; the socket's directory must exist).",
                "cid=3,socket=/run/vireo/web.vsock",
            ),
        ),
        (
            "RngOptions",
            option(
                "The value of `vireo run --rng`: `\"\"` for the defaults or `bw=RATE` (bytes per second, K/M/G suffixes).",
                "",
            ),
        ),
        (
            "BalloonOptions",
            option(
                "The value of `vireo run --balloon`: `\"\"` for the defaults, or `target=MIB` (less than memory_mib), `deflate_on_oom=on|off`, `free_page_reporting=on|off`.",
                "target=128",
            ),
        ),
    ]
}

pub fn vm_name() -> Ref {
    Ref::from_schema_name("VmName")
}

pub fn vm_names() -> ArrayBuilder {
    ArrayBuilder::new().items(vm_name())
}

pub fn snapshot_tag() -> Ref {
    Ref::from_schema_name("SnapshotTag")
}

/// `null` or one of the named schemas.
fn or_null(name: &str, description: &str) -> OneOfBuilder {
    OneOfBuilder::new()
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .item(Ref::from_schema_name(name))
        .description(Some(description))
}

pub fn snapshot_tag_or_null() -> OneOfBuilder {
    or_null(
        "SnapshotTag",
        "The snapshot's name [default: the UTC time, YYYYmmdd-HHMMSS].",
    )
}

const DISKS: &str = "virtio-blk disks in order (the first is the guest's vda).";
const NETS: &str = "virtio-net devices in order.";
const REPLACES: &str = " Replaces the list; [] or null removes them all.";

pub fn disks() -> ArrayBuilder {
    ArrayBuilder::new()
        .items(Ref::from_schema_name("DiskOptions"))
        .description(Some(DISKS))
}

pub fn nets() -> ArrayBuilder {
    ArrayBuilder::new()
        .items(Ref::from_schema_name("NetOptions"))
        .description(Some(NETS))
}

pub fn disks_update() -> ArrayBuilder {
    disks()
        .schema_type(SchemaType::Array(vec![Type::Array, Type::Null]))
        .description(Some(format!("{DISKS}{REPLACES}")))
}

pub fn nets_update() -> ArrayBuilder {
    nets()
        .schema_type(SchemaType::Array(vec![Type::Array, Type::Null]))
        .description(Some(format!("{NETS}{REPLACES}")))
}

pub fn vsock() -> OneOfBuilder {
    or_null("VsockOptions", "A virtio-vsock device; null for none.")
}

pub fn rng() -> OneOfBuilder {
    or_null(
        "RngOptions",
        "A virtio-rng device (\"\" for the defaults); null for none.",
    )
}

pub fn balloon() -> OneOfBuilder {
    or_null(
        "BalloonOptions",
        "A virtio-balloon device (\"\" for the defaults); null for none.",
    )
}
