//! Compiles `proto/kv.proto` with tonic-build. protoc comes from the `protoc-bin-vendored`
//! crate, so a fresh machine needs no protoc installed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    println!("cargo:rerun-if-changed=proto/kv.proto");
    tonic_build::configure().compile_protos(&["proto/kv.proto"], &["proto"])?;
    Ok(())
}
