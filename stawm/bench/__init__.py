"""The throughput benchmark (studies/throughput.py): its variants and plan (`benchmark`), its report (`report`)."""
