//! Links libucm and libucs besides the libucp ucx1-sys links: kvrail reads
//! UCM's options and registers a UCM event handler, and calls
//! `ucs_status_string` directly.
fn main() {
    println!("cargo:rustc-link-lib=ucm");
    println!("cargo:rustc-link-lib=ucs");
}
