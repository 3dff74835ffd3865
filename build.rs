//! Compiles `proto/kv.proto` (our API) and `proto/etcd_kv.proto` (the slice of etcd's v3 KV API
//! that `kvctl bench --target etcd` calls) with tonic-build. protoc comes from the
//! `protoc-bin-vendored` crate, so a fresh machine needs no protoc installed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    println!("cargo:rerun-if-changed=proto/kv.proto");
    println!("cargo:rerun-if-changed=proto/etcd_kv.proto");
    // A rebuilt node's received pairs stay slices of the received buffer until sled copies them.
    tonic_build::configure()
        .bytes([".kv.v1.KvPair"])
        .compile_protos(&["proto/kv.proto"], &["proto"])?;
    // kvctl is only ever a client of etcd; the server half is what tests/operations.rs fakes
    // etcd with, to test `kvctl bench --target etcd` where no etcd is installed.
    tonic_build::configure().compile_protos(&["proto/etcd_kv.proto"], &["proto"])?;
    Ok(())
}
