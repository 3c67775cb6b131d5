"""The `i2am` command."""
import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="i2am", description="I2AM attribution maps for image-to-image diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="analyse the embedded tiny image-to-image model")
    demo.add_argument("--out", default="i2am-demo")
    args = parser.parse_args(argv)
    if args.command == "demo":
        print("i2am demo: the embedded demo model is not yet available (issue 7); nothing to do.")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
