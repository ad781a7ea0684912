"""The subcommands of ``ebm-fast`` (build, info, bench, train, check-gpu); see ebm_fast/cli.py."""
