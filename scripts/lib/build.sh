#!/usr/bin/env bash
# The one build every script makes: --all-targets, as the test command's build stage does.
# A narrower build (--bins, --bin tdefs) resolves some dependencies' features without the
# dev-dependencies, so cargo compiles a second variant of tdefs and its dependencies (3.5
# minutes on 2 CPUs) and points target/release/tdefs at it: the suite, the benchmark and the
# package would then not run the binary the cargo tests ran. Run from the repository root.
exec cargo build --release --quiet --all-targets
