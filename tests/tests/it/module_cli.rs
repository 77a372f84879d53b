//! Modules add their own subcommands through the `Module` trait (issue 2, item 2): the CLI
//! parses them with clap beside the kernel's commands, and bad arguments exit 2 naming them.

use std::sync::Arc;

use bulwark_tests::probe::{ProbeModule, ProbeState};

fn run(state: &Arc<ProbeState>, args: &[&str]) -> i32 {
    let mut modules = bulwark::modules::compiled();
    modules.push(Arc::new(ProbeModule {
        state: state.clone(),
    }));
    bulwark::commands::main(modules, args.iter().map(Into::into))
}

#[test]
fn module_subcommand_runs_and_rejects_bad_arguments() {
    let state = Arc::new(ProbeState::default());
    assert_eq!(
        run(&state, &["bulwark", "probe", "ping", "--times", "3"]),
        0
    );
    assert_eq!(state.commands.lock().expect("lock").as_slice(), ["pong x3"]);
    // Usage errors (clap) exit 2; a failing command exits 1.
    assert_eq!(
        run(&state, &["bulwark", "probe", "ping", "--times", "many"]),
        2
    );
    assert_eq!(run(&state, &["bulwark", "probe", "ping"]), 2);
    assert_eq!(run(&state, &["bulwark", "probe"]), 2);
    assert_eq!(
        run(&state, &["bulwark", "probe", "ping", "--times", "0"]),
        1
    );
    assert_eq!(
        state.commands.lock().expect("lock").len(),
        1,
        "failed runs did nothing"
    );
    // Kernel commands still work next to module commands.
    assert_eq!(run(&state, &["bulwark", "--version"]), 0);
    assert_eq!(run(&state, &["bulwark", "nosuchcommand"]), 2);
}
