//! `bulwark`: the one binary.

fn main() {
    let code = bulwark::commands::main(bulwark::modules::compiled(), std::env::args_os());
    std::process::exit(code);
}
