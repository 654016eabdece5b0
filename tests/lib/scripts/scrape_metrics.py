"""Prints the body of one HTTP GET of argv[1] (a /metrics URL)."""

import sys
import urllib.request

print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())
