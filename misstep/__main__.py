"""The `misstep` command (and `python -m misstep`): offline first, then the CLI."""

from __future__ import annotations

from misstep.offline import offline


def main() -> None:
    offline()  # before the CLI imports DSPy, which imports LiteLLM
    from misstep.cli import app  # noqa: PLC0415 (imported after the switches are set, on purpose)

    app()


if __name__ == "__main__":
    main()
