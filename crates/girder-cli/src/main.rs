//! The `girder` binary: the built-in example functions under girder's command line.

// The grid allocates many small, short-lived objects across threads; mimalloc serves them
// measurably faster than the system allocator (see `girder bench`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    girder_cli::main_with(girder::Registry::with_examples())
}
