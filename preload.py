"""AUTOMATIC1111 preload: command-line flags of the Medical Diffusion extension."""


def preload(parser):
    parser.add_argument(
        "--medical-diffusion-roots",
        nargs="+",
        default=None,
        metavar="DIR",
        help="Medical Diffusion: folders the extension may read and write; any other path "
        "typed in its UI or sent to its API is refused (default: no restriction)",
    )
