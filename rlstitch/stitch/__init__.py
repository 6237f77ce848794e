"""Stage 1 stitch search: sufficient statistics, closed-form fits and pair selection (SPEC §1)."""
