//! The `girder` binary: the built-in example functions under girder's command line.

fn main() -> std::process::ExitCode {
    girder_cli::main_with(girder::Registry::with_examples())
}
