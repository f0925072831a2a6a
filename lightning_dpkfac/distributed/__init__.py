"""What the ranks share and how: collectives with byte counters, the owner map, the DDP gradient hook, row
gathering, and the two distribution modes (dpkfac, dkfac)."""
