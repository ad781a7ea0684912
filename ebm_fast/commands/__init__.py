"""The maintenance subcommands of ``ebm-fast`` (build, info, bench); see ebm_fast/cli.py."""
