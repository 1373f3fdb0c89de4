//! Crash torture in CI (issue 3): tdefs killed with SIGKILL mid-workload (alone, and with
//! the workload), remounted, every durable operation verified. `scripts/crash-torture.sh`
//! runs the same tool for hundreds of cycles.

use std::process::Command;

fn torture(mode: &str, method: &str, cycles: u32, seed: u64) {
    let out = Command::new(env!("CARGO_BIN_EXE_tdefs-torture"))
        .args(["run", "--tdefs", env!("CARGO_BIN_EXE_tdefs"), "--mode", mode, "--method", method])
        .args(["--cycles", &cycles.to_string(), "--seed", &seed.to_string()])
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    assert!(out.status.success(), "crash torture failed:\n{text}");
    assert!(text.contains(&format!("{cycles} cycles")), "{text}");
}

#[test]
fn kill_dash_nine_of_the_daemon_mixed_modes() {
    torture("mixed", "aes256-ctr", 24, 11);
}

#[test]
fn kill_dash_nine_with_sm4() {
    torture("kill-fs", "sm4-ctr", 8, 12);
}
