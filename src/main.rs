fn main() -> std::process::ExitCode {
    tdefs::cli::main()
}
