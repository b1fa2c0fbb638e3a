"""Command-line flags of the Re-Basin extension. AUTOMATIC1111 and Forge load this file by path and call `preload`
with their argument parser before they parse the command line (modules/script_loading.py preload_extensions), so it
imports nothing of ours."""


def preload(parser):
    parser.add_argument(
        "--rebasin-allowed-hosts", type=str, default=None, metavar="NAME[,*.DOMAIN]",
        help="Re-Basin HTTP API: host names it answers to besides localhost and the --listen / --server-name address, "
             "comma-separated, e.g. a tunnel's or a cloud proxy's (*.proxy.example for all its names); also the "
             "REBASIN_ALLOWED_HOSTS environment variable and Settings > Re-Basin")
