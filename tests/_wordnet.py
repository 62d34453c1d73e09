"""WordNet for the tests: skip where it is not installed, fail instead under CI.

CI installs Debian's ``wordnet-base`` and sets ``LOSSKERNEL_REQUIRE_WORDNET=1``; then a
missing or unreadable WordNet is a failure, not a skip.
"""

import os

import pytest

from devinterp_losskernel.hierarchy import ensure_wordnet, wordnet_available

REQUIRED = os.environ.get("LOSSKERNEL_REQUIRE_WORDNET") == "1"


def require_wordnet(data_dir=None):
    """nltk's WordNet reader, or skip (fail when LOSSKERNEL_REQUIRE_WORDNET=1)."""
    if not wordnet_available():
        message = ("WordNet is not installed (neither nltk's wordnet nor /usr/share/wordnet); "
                   "apt-get install wordnet-base")
        if REQUIRED:
            pytest.fail("LOSSKERNEL_REQUIRE_WORDNET=1 but " + message)
        pytest.skip(message)
    return ensure_wordnet(data_dir)


@pytest.fixture(scope="session")
def wordnet(tmp_path_factory):
    """WordNet loaded for nltk; a Debian copy goes to a temporary nltk-data folder unless
    LOSSKERNEL_NLTK_DATA names one."""
    data_dir = None if os.environ.get("LOSSKERNEL_NLTK_DATA") else tmp_path_factory.mktemp("nltk_data")
    return require_wordnet(data_dir)
