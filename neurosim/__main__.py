"""``python -m neurosim COMMAND ...``: the ``neurosim`` command."""

from neurosim.tools.cli import main

if __name__ == "__main__":
    main()
