"""The broker's settings are one object: every command-line flag comes from a BrokerSettings
field with its help, unit and the field's own default."""

from __future__ import annotations

import argparse
from dataclasses import fields

from federation.broker.settings import BrokerSettings, add_arguments, from_arguments
from federation.cli import build_parser


def test_every_setting_has_a_flag_with_its_default_and_help():
    parser = build_parser()
    defaults = from_arguments(parser.parse_args(["broker"]), cloud_prices=None)
    for f in fields(BrokerSettings):
        if f.name == "cloud_prices":
            continue
        # The command line's defaults are the dataclass's (poll_timeout is derived from the
        # provider timeout, the one setting that is not a flag).
        expected = 15.0 if f.name == "poll_timeout" else getattr(BrokerSettings(
            cloud_prices=None), f.name)
        assert getattr(defaults, f.name) == expected, f.name
    # One line per flag, whatever the terminal's width, so no word is broken at a hyphen.
    shown = argparse.ArgumentParser(
        formatter_class=lambda prog: argparse.HelpFormatter(prog, width=100_000))
    add_arguments(shown)
    text = " ".join(shown.format_help().split())
    for f in fields(BrokerSettings):
        if f.metadata.get("cli", True):
            flag = "--" + f.name.replace("_", "-")
            assert flag in text, flag
            assert " ".join(f.metadata["help"].split())[1:] in text, f.name

def test_hours_on_the_command_line_are_seconds_in_the_settings():
    args = build_parser().parse_args(["broker", "--fair-share-half-life", "24",
                                      "--reliability-half-life", "0.5",
                                      "--provider-timeout", "10", "--rate-limit", "5"])
    settings = from_arguments(args, cloud_prices=None)
    assert settings.fair_share_half_life == 24 * 3600
    assert settings.reliability_half_life == 1800
    assert settings.provider_timeout == 10 and settings.poll_timeout == 5
    assert settings.rate_limit == 5
