"""`python -m fip_peft ...` runs the `fip-peft` command."""

from fip_peft.apps.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
