"""``python -m agentd``: the same as the ``agentd`` command."""

from agentd.entry import main

main()
