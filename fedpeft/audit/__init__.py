"""Privacy audits: planted canaries, exposure, membership inference, epsilon lower bounds, reports."""
