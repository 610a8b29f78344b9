fn main() -> std::process::ExitCode {
    sefi::cli::main()
}
