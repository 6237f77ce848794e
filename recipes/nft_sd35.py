"""python recipes/nft_sd35.py [config=tiny|sd35-medium] [mode=stitch|baseline] [key=value ...]

On a cluster: ray job submit --working-dir . -- python recipes/nft_sd35.py config=sd35-medium

DiffusionNFT with StitchVM on SD3.5 (SD3.5-M at 512 px for users with weights; tiny-sd3 on the tiny world).
The driver loop is recipes/nft_flux.py's; only the configs under recipes/configs/nft_sd35/ differ.
"""

from __future__ import annotations

from nft_flux import main as nft_main


def main(argv: list[str] | None = None) -> dict:
    """Train; returns the run summary."""
    return nft_main(argv, recipe="nft_sd35")


if __name__ == "__main__":
    main()
