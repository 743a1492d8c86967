"""Hand-written fragments that turn the short documents of corpus_text.py into long ones.

Used by benchmarks/make_varied_corpus.py, which needs documents of 20 to ~1,500 words:

- a package description grows into a README: installation for its language, then sections
  (quick start, configuration, contributing, ...) and a changelog;
- a support ticket grows into a thread of replies between the customer and support agents,
  with pasted diagnostics for technical tickets;
- an abstract grows into the first pages of the paper: introduction, methods, results,
  discussion, limitations and the usual statements.

Placeholders in braces are filled from the facts stored with each document: ``{name}``,
``{language}``, ``{license}`` for packages; ``{first}`` (customer's first name), ``{agent}``,
``{title}`` for tickets; ``{field}``, ``{subject}``, ``{data}`` for abstracts.
"""

from __future__ import annotations

# --- packages ------------------------------------------------------------------------------

PACKAGE_SUMMARIES: dict[str, str] = {
    "quiver-csv": "A forgiving, streaming CSV reader and writer for messy real-world files.",
    "logrotor": "Daemon that rotates and compresses log files as soon as they grow too large.",
    "ringlog": "Lock-free bounded ring buffer for structured log records.",
    "pgdiffer": "Compare two PostgreSQL schemas and print the migration SQL.",
    "datefmt-lite": "Tiny date formatting and parsing on top of the Intl API.",
    "Marginalia": "Desktop EPUB and PDF reader for heavy annotators.",
    "tidyspectra": "Import, clean and plot spectroscopy data as tidy data frames.",
    "fonts-kestrel": "Kestrel, a monospaced programming font with optional ligatures.",
    "jsonpatch-j": "JSON Patch and JSON Merge Patch for Java.",
    "rack-quota": "Per-client request quotas for Rack applications.",
    "tidytex": "An opinionated, diff-friendly formatter for LaTeX sources.",
    "science-geography": "Debian Science metapackage for geography workstations.",
    "ex_backoff": "Exponential backoff with jitter and deadlines for Elixir.",
    "Tallyho": "Self-hosted household budgeting for families and flatshares.",
    "dotsync": "Keep dotfiles in sync with git and a single shell script.",
    "fixedpoint.hpp": "Header-only fixed-point arithmetic for C++17.",
}

INSTALL: dict[str | None, str] = {
    "Python": (
        "Installation\n\nInstall the latest release from PyPI with pip install {name}. Wheels are "
        "pure Python, so there is nothing to compile. To work on {name} itself, clone the "
        "repository and run pip install -e \".[dev]\" in a virtual environment; this also "
        "installs the test and linting tools."
    ),
    "Rust": (
        "Installation\n\nAdd the crate to your project with cargo add {name}. Optional features "
        "are off by default and are listed in Cargo.toml; enable them with --features. The "
        "crate builds on stable Rust and is tested on Linux, macOS and Windows in CI."
    ),
    "Go": (
        "Installation\n\nWith a recent Go toolchain, run go install for the module path given "
        "on the releases page. Prebuilt binaries for Linux, macOS and Windows on amd64 and "
        "arm64 are attached to every release together with their checksums, and a container "
        "image is published for each tag."
    ),
    "TypeScript": (
        "Installation\n\nnpm install {name}, or the equivalent with pnpm or yarn. The package "
        "has no runtime dependencies. Type declarations are included, so there is no separate "
        "@types package to install. A UMD build for script tags is available from the usual "
        "CDNs."
    ),
    "C": (
        "Installation\n\nMost distributions package {name}; on Debian and Ubuntu run "
        "apt install {name}. To build from source you need a C99 compiler, make and the zlib "
        "headers: run ./configure, make and make install. The configure script accepts "
        "--prefix and --sysconfdir as usual."
    ),
    "C++": (
        "Installation\n\nThe recommended way to build {name} is with CMake 3.20 or later: "
        "cmake -B build, then cmake --build build. Packages for vcpkg and Conan are maintained "
        "by the community and usually follow a release within a few days."
    ),
    "R": (
        "Installation\n\nInstall the released version from CRAN with install.packages(\"{name}\"), "
        "or the development version from GitHub with the remotes package. The package depends "
        "only on packages that are themselves on CRAN, and it is checked on Windows, macOS and "
        "Linux before every release."
    ),
    "Java": (
        "Installation\n\nThe artifacts are published to Maven Central. Add the dependency to "
        "your pom.xml or build.gradle using the group and version shown on the releases page. "
        "The jar is a Java module and also works on the classpath; it has no transitive "
        "dependencies apart from the optional adapters."
    ),
    "Ruby": (
        "Installation\n\nAdd gem \"{name}\" to your Gemfile and run bundle install, or install it "
        "yourself with gem install {name}. Ruby 3.0 or newer is required. Redis is only needed "
        "if you use the Redis store."
    ),
    "Haskell": (
        "Installation\n\nDownload a binary from the releases page, or build from source with "
        "cabal install {name} or stack install. Building from source takes a few minutes the "
        "first time because of the dependencies; GHC 9.4 through 9.8 are supported."
    ),
    "Elixir": (
        "Installation\n\nAdd {{:{name}, \"~> 1.2\"}} to the deps function in your mix.exs and run "
        "mix deps.get. Documentation is published on HexDocs."
    ),
    "Shell": (
        "Installation\n\nDownload the script, check it against the published checksum, make it "
        "executable and put it somewhere on your PATH. It needs only a POSIX shell, git and the "
        "usual core utilities, so it also runs on BusyBox systems and in minimal containers."
    ),
    None: (
        "Installation\n\nOn Debian and derived distributions run apt install {name}. Users of "
        "other systems can download the release archive from the project page; it contains "
        "the files and a short installation note for each platform."
    ),
}

README_SECTIONS: list[str] = [
    "Quick start\n\nThe examples directory contains small, self-contained files that show the "
    "most common uses of {name}. Start with the first one, which takes less than a minute to "
    "run, and change it step by step towards what you need. Every example is run in CI, so "
    "they never fall out of date with the code.",

    "Documentation\n\nThe user guide explains the concepts behind {name} and walks through "
    "typical tasks; the reference documents every option. Both are built from the docs "
    "directory of the repository, so a documentation fix is an ordinary pull request. If "
    "something in the guide is unclear, please open an issue: unclear documentation is a bug.",

    "Configuration\n\nDefaults are chosen so that most users never need a configuration file. "
    "When you do, settings are read in this order, later ones overriding earlier ones: the "
    "built-in defaults, a system-wide file, a per-user file in the XDG configuration "
    "directory, environment variables starting with the program name in capitals, and finally "
    "command-line options. Run with --print-config to see the settings in effect and where each "
    "one came from.",

    "Design goals\n\n{name} tries to do one thing well. It favours predictable behaviour over "
    "clever heuristics, clear error messages over silent recovery, and a small API that is "
    "easy to learn over one that covers every corner case. Features that can be built outside "
    "the package on top of its public interface usually stay outside.",

    "Non-goals\n\nSome requests come up regularly and are out of scope: a graphical "
    "configuration interface, plugins loaded at run time, and compatibility shims for "
    "releases that are no longer supported. We would rather point to other projects that "
    "do these things well than do them badly here.",

    "Performance\n\nWe keep a small benchmark suite in the repository and run it on every pull "
    "request; a change that slows down a benchmark by more than five per cent needs a good "
    "reason. The numbers in the documentation were measured on an ordinary laptop, not a "
    "tuned server, and should be read as orders of magnitude rather than promises.",

    "Supported platforms\n\nEvery release is tested on the current and previous long-term "
    "releases of Ubuntu, on macOS on both Intel and Apple silicon, and on Windows Server. "
    "Other platforms are known to work but are not tested in CI. Patches for them are "
    "welcome if they come with a way to test them.",

    "Versioning\n\nThe project follows semantic versioning. The public API is what is documented "
    "in the reference; anything else, including names that start with an underscore, can "
    "change in any release. Deprecated functions emit a warning for at least one minor release "
    "before they are removed, and the changelog lists every removal.",

    "Building from source\n\nClone the repository and run the build as described in the "
    "contributing guide. The default build type includes debug assertions, which are useful "
    "when you are working on {name} but make it noticeably slower; use a release build for "
    "benchmarks. A full build and test run takes a few minutes on a recent machine.",

    "Testing\n\nThe test suite has unit tests for individual functions, integration tests that "
    "exercise the command line and the public API end to end, and a set of regression tests "
    "for bugs reported by users, each named after its issue number. Property-based tests "
    "generate random inputs for the parsers and check that every input either parses or "
    "fails with a proper error.",

    "Contributing\n\nContributions are welcome, from typo fixes to new features. For anything "
    "larger than a small bug fix, please open an issue first so that we can agree on the "
    "approach before you spend time on it. Pull requests need tests and a changelog entry, and "
    "they must pass the formatter and the linter; the CI configuration shows the exact commands.",

    "Reporting bugs\n\nPlease include the version of {name}, your operating system, the "
    "smallest input that reproduces the problem and the complete error message. A failing "
    "test case is the most useful bug report of all. We try to answer every report within a "
    "week, but this is a volunteer project and sometimes it takes longer.",

    "Security\n\nPlease do not report security problems in the public issue tracker. Send them "
    "to the address in SECURITY.md instead; you will receive an acknowledgement within three "
    "working days. We publish an advisory and a fixed release together once a fix is ready, and "
    "we credit reporters unless they prefer otherwise.",

    "Frequently asked questions\n\nWhy is the output different from the previous version? Most "
    "likely because a bug was fixed; the changelog lists every change in behaviour. Can I use "
    "{name} in a commercial product? Yes, within the terms of the license. Is there a mailing "
    "list? No, but the discussions page on the repository serves the same purpose.",

    "Related projects\n\nSeveral other projects solve similar problems with different "
    "trade-offs, and the documentation has a page comparing them honestly. If {name} does not "
    "fit your use case, one of them probably will, and we are happy to link to any project "
    "that is missing from that page.",

    "Roadmap\n\nThe next minor release will focus on better error messages and on the "
    "long-standing requests in the issue tracker labelled help-wanted. A 2.0 release with "
    "breaking changes is not planned; when one becomes necessary it will be announced at least "
    "six months in advance, with a migration guide.",

    "Acknowledgements\n\n{name} started as a weekend project and grew thanks to its "
    "contributors, who are listed in the AUTHORS file. Continuous integration is provided free "
    "of charge for open-source projects, and several companies that use {name} in production "
    "have sponsored maintenance work.",

    "License\n\n{name} is distributed under the terms of the {license} license; the full text is "
    "in the LICENSE file. Contributions are accepted under the same terms, and by submitting a "
    "pull request you confirm that you have the right to license your work this way.",

    "Code of conduct\n\nEveryone who takes part in the project, in the issue tracker, in pull "
    "requests or in chat, is expected to follow the code of conduct in the repository. The "
    "maintainers enforce it, and reports can be sent to them privately.",
]

CHANGELOG_ITEMS: list[str] = [
    "Fixed a crash when the input is empty.",
    "Fixed a memory leak when an operation was cancelled halfway.",
    "Error messages now include the file name and line number.",
    "Improved performance of the common case by about 20 per cent.",
    "Dropped support for end-of-life versions of the runtime.",
    "Added a --quiet option that suppresses progress output.",
    "Added a --dry-run option that shows what would be done without doing it.",
    "The default log level is now warning instead of info.",
    "Documented every configuration option in the reference.",
    "Fixed handling of paths that contain spaces on Windows.",
    "Fixed a race condition that could cause a hang on shutdown.",
    "Deprecated the old configuration keys; they will be removed in the next major release.",
    "Reduced the size of the release artifacts by stripping debug symbols.",
    "Release artifacts are now signed and published with checksums.",
    "Fixed an off-by-one error in the reported column numbers.",
    "Timestamps are now written in UTC with an explicit offset.",
    "Added support for reading gzip- and zstd-compressed input.",
    "The command now exits with status 2 on invalid arguments, as documented.",
    "Fixed incorrect results when two options were combined.",
    "Environment variables now override values from the configuration file.",
    "Updated the bundled test data to include more edge cases.",
    "Improved the wording of the warning shown for deprecated options.",
    "Fixed a regression introduced in the previous release that broke the example files.",
    "Added a migration guide from the previous major version.",
    "Internal: switched the continuous integration to a matrix of operating systems.",
    "Internal: the test suite now runs in about half the time.",
    "Fixed a build failure with the latest compiler release.",
    "Fixed unclear behaviour when the output file already exists; it is now an error by default.",
    "Added an option to write output atomically through a temporary file.",
    "Handle interrupted system calls correctly instead of reporting them as errors.",
    "Large inputs are now processed in chunks, keeping memory use constant.",
    "Fixed a typo in the help text.",
    "Corrected the license headers in several source files.",
    "Thanks to three new contributors for their first pull requests.",
]

# --- tickets -------------------------------------------------------------------------------

AGENTS = ["Sam", "Maya", "Daniel", "Ines", "Kofi", "Lena", "Arjun", "Chloe"]

# Replies specific to a ticket category, in the order they would be sent: the first opens the
# conversation, the last resolves it, any in between belong to the middle of the thread.
AGENT_REPLIES: dict[str, list[str]] = {
    "billing": [
        "Hi {first},\n\nThanks for reaching out, and sorry for the trouble with your billing. "
        "I can see the charges you mentioned on your account and I have passed the case to our "
        "billing team, who are the only ones able to issue refunds and corrected invoices. They "
        "usually respond within one business day. I'll keep this ticket open and update you as "
        "soon as I hear from them.\n\nBest,\n{agent}",

        "Hi {first},\n\nOur billing team has reviewed your account. The adjustment has been made "
        "and you should see it on your statement within five to ten business days, depending on "
        "your bank. A corrected invoice is available under Settings > Billing > Invoices. Please "
        "let me know if anything still looks wrong.\n\n{agent}",
    ],
    "account_access": [
        "Hi {first},\n\nI'm sorry you're locked out. For your security we can only restore access "
        "after verifying that you own the account. Please reply from the email address on the "
        "account with the last four digits of the payment card on file and the approximate date "
        "of your last successful login. Once we have confirmed these, I can reset your sign-in "
        "settings.\n\nThanks for your patience,\n{agent}",

        "Hi {first},\n\nThank you, the details match our records. I've reset the sign-in settings "
        "on your account and sent a one-time login link to your email address; it is valid for 30 "
        "minutes. After logging in, please set up two-factor authentication again and store the "
        "new backup codes somewhere safe.\n\n{agent}",
    ],
    "bug_report": [
        "Hi {first},\n\nThanks for the report. I haven't been able to reproduce this yet. Could "
        "you send us a few more details: the exact version you're using, the time the problem "
        "last happened (with your time zone), and if possible a screen recording? If you can "
        "export the diagnostic log from the help menu and attach it here, our engineers can look "
        "at what happened on your side.\n\nThanks,\n{agent}",

        "Hi {first},\n\nJust to confirm I understand correctly: the problem started recently, it "
        "happens every time rather than occasionally, and nothing changed on your side before "
        "it started? That narrows things down considerably.\n\n{agent}",

        "Hi {first},\n\nThanks for the extra details, that helps a lot. With them I was able to "
        "reproduce the problem on our side and have filed it with the engineering team, marked "
        "as affecting customers. I can't promise a date yet, but I'll update this ticket as soon "
        "as a fix is scheduled.\n\n{agent}",

        "Hi {first},\n\nGood news: the fix for this issue is part of the release that went out "
        "this morning. Please update and let us know whether everything works as expected. If "
        "it does, you don't need to reply and this ticket will close automatically in a week.\n\n"
        "{agent}",
    ],
    "feature_request": [
        "Hi {first},\n\nThank you for the suggestion and for explaining your use case so clearly. "
        "I've added your request to our product feedback board, where the product team reviews "
        "requests every month. I can't share a timeline, but requests with a clear business case "
        "like yours carry a lot of weight. I'll let you know if there is news.\n\n{agent}",

        "Hi {first},\n\nA quick update: this is now on our roadmap for the coming quarter, and the "
        "product team is looking for customers who would like to try an early version. If you'd "
        "like to join the beta, reply to this email and I'll put you in touch with them.\n\n"
        "{agent}",
    ],
    "other": [
        "Hi {first},\n\nThanks for contacting us. I've read through your message and I'm looking "
        "into it now. I'll get back to you with an answer as soon as possible, and no later than "
        "tomorrow.\n\nBest regards,\n{agent}",

        "Hi {first},\n\nThank you for your patience while I checked this with the relevant team. "
        "Here is what we can do: I've made the change you asked for on your account, and you "
        "should receive a confirmation email shortly. Please reply if anything is not as "
        "expected.\n\n{agent}",
    ],
}

# Agent messages that fit anywhere in the middle of a thread.
AGENT_GENERIC: list[str] = [
    "Hi {first},\n\nI'm following up on my previous message. Have you had a chance to look "
    "at it? Let me know what you see and we'll take it from there.\n\n{agent}",

    "Hi {first},\n\nI'm sorry for the slow response, we've had an unusually high volume of "
    "tickets this week. I've taken over your case from my colleague and read the whole "
    "thread, so you don't need to repeat anything.\n\n{agent}",

    "Hi {first},\n\nI completely understand your frustration, and I apologise that this has "
    "taken longer than it should have. I've escalated the ticket to our team lead, who will "
    "review it personally today.\n\n{agent}",

    "Hi {first},\n\nThanks for the screenshots. They show exactly what I needed to see, and "
    "I've attached them to the internal ticket so the team has the full picture.\n\n{agent}",

    "Hi {first},\n\nA short update: the team is still working on this. I don't have a result "
    "for you yet, but I haven't forgotten about your ticket and I'll write again as soon as I "
    "know more.\n\n{agent}",

    "Hi {first},\n\nWe don't offer phone support on your plan, I'm afraid, but I'm happy to "
    "continue here, and I'll make sure this ticket stays with me so that you don't have to "
    "explain everything again.\n\n{agent}",
]

# Agent messages that end a thread (after the resolving reply).
AGENT_CLOSINGS: list[str] = [
    "Hi {first},\n\nAs a small thank-you for your patience, I've added a credit to your "
    "account, which will be applied automatically to your next invoice. I'll close this "
    "ticket now; just reply if anything else comes up.\n\n{agent}",

    "Hi {first},\n\nGlad to hear it's sorted. I'll close this ticket now; if anything else "
    "comes up, just reply to this email and it will reopen.\n\n{agent}",
]

# Customer messages for the middle of a thread.
CUSTOMER_FOLLOWUPS: list[str] = [
    "Thanks for getting back to me so quickly. I'll wait for the update.\n\n{first}",

    "Hi {agent},\n\nIt has now been three days and I haven't heard anything. Can you tell me "
    "where things stand? This is holding up work for my whole team.\n\n{first}",

    "Hello,\n\nHere are the details you asked for. I have attached the screenshots. Let me "
    "know if you need anything else from me.\n\n{first}",

    "Hi,\n\nSorry for the late reply, I was travelling. Nothing has changed on our side, and "
    "the problem is still there this morning.\n\n{first}",

    "Hello again,\n\nI'm a bit frustrated, to be honest. This is the third time I'm explaining "
    "the same problem, and every reply asks me for information I already gave in my first "
    "message. Could someone please read the whole thread and tell me when this will be "
    "sorted out?\n\n{first}",

    "Hi,\n\nOne more thing I noticed: a colleague on the same plan doesn't have this problem, "
    "only I do. Not sure if that helps.\n\n{first}",

    "Hi,\n\nIs there a phone number I can call? It would be much faster to sort this out in a "
    "five-minute call than by email.\n\n{first}",

    "Hi {agent},\n\nAny news? I don't want to be pushy, but I need to give my manager an "
    "update by Friday.\n\n{first}",
]

# Customer messages that end a thread.
CUSTOMER_CLOSINGS: list[str] = [
    "That worked, thank you! Much appreciated.\n\n{first}",

    "Thanks {agent}, that solved it. Sorry if I was short with you earlier, it has been a "
    "stressful week.\n\n{first}",

    "Confirmed, everything looks right now. Thanks for sticking with it.\n\n{first}",
]

# Pasted diagnostics for the technical tickets, by ticket title.
DIAGNOSTICS: dict[str, str] = {
    "Android app crashes when uploading a photo": (
        "Diagnostic information (copied from the About screen):\n"
        "App version: 5.12.0 (build 51200417)\n"
        "OS: Android 14, security patch 2024-03-05\n"
        "Device: Google Pixel 7, 8 GB RAM, 37 GB free\n"
        "Language: English (United States)\n"
        "Network: Wi-Fi, VPN off\n"
        "Last sync: 2024-03-18 07:42:10"
    ),
    "CSV export cuts off rows with accented characters": (
        "Here is what the browser console shows when I export:\n"
        "Uncaught (in promise) TypeError: Cannot read properties of undefined (reading 'length')\n"
        "    at encodeRow (export.7c1e2a.js:1:48213)\n"
        "    at async onExportClick (contacts.91be3f.js:1:10877)\n"
        "Warning: 41 rows contained characters that could not be encoded\n"
        "Export finished: 2,318 rows, 2,277 complete"
    ),
    "URGENT: API returning 502 for all requests": (
        "Output of curl -v against the endpoint:\n"
        "> POST /v2/orders HTTP/2\n"
        "> Host: api.example.com\n"
        "> content-type: application/json\n"
        "< HTTP/2 502\n"
        "< content-type: text/html\n"
        "< x-request-id: 1b8e0c44-5f2a-4e3d-8c71-9a0d2e6f4b13\n"
        "< date: Mon, 18 Mar 2024 09:52:31 GMT\n"
        "<html><head><title>502 Bad Gateway</title></head></html>"
    ),
    "Calendar sync shows meetings an hour off since clocks changed": (
        "This is the event as it arrives in Google Calendar (from the .ics attachment):\n"
        "BEGIN:VEVENT\n"
        "SUMMARY:Project review\n"
        "DTSTART:20240312T180000Z\n"
        "DTEND:20240312T183000Z\n"
        "ORGANIZER:mailto:grace.liu@example.com\n"
        "END:VEVENT\n"
        "The meeting was created for 10:00 Vancouver time, which is 17:00 UTC after the change."
    ),
}

# --- abstracts -----------------------------------------------------------------------------

PAPER_SECTIONS: dict[str, list[str]] = {
    "1 Introduction": [
        "Research on {subject} has grown rapidly over the past two decades, but most studies in "
        "{field} have relied on {data} collected at a single site or over a short period. As a "
        "result, it remains unclear how far the patterns reported so far generalise, and which "
        "of the proposed mechanisms are responsible for them. Reviews of the literature have "
        "repeatedly called for larger and more systematic studies.",

        "Two explanations have dominated the discussion. The first attributes the observed "
        "differences to conditions that vary between study settings; the second attributes them "
        "to the way {data} are collected and processed. The two explanations make different "
        "predictions, but they have rarely been tested against each other with the same data, "
        "in part because suitable data have only recently become available.",

        "Progress in {field} has often come from better measurement rather than new theory. "
        "Advances in instrumentation and in the availability of {data} now make it possible to "
        "revisit questions about {subject} that were previously out of reach, and to do so at a "
        "scale at which small effects can be distinguished from noise.",

        "In this paper we address this gap. We first describe the data and the methods used to "
        "analyse them, then present our main results together with a series of robustness "
        "checks, and finally discuss what the findings imply for theory and practice in {field} "
        "and which questions remain open.",
    ],
    "2 Materials and methods": [
        "Our analysis is based on {data} assembled specifically for this study. Inclusion "
        "criteria were defined before any data were examined and are listed in the supplementary "
        "material, together with the number of cases excluded at each step and the reason for "
        "exclusion. All procedures were approved by the relevant institutional review boards.",

        "Preprocessing followed established protocols in {field}. Obvious recording errors were "
        "removed automatically using thresholds fixed in advance, and the remaining records were "
        "checked by two researchers independently; disagreements were resolved by discussion. "
        "The processed data set and the scripts used to produce it are available as described "
        "in the data availability statement.",

        "For the statistical analysis we used mixed-effects models with random intercepts for "
        "site and year, which account for the non-independence of repeated observations. Model "
        "assumptions were checked by inspecting residuals. Uncertainty is reported as 95 per "
        "cent confidence intervals, and all tests are two-sided. Analyses were carried out in R "
        "and Python; package versions are listed in the supplement.",

        "To test the sensitivity of our conclusions to analytical choices, we repeated the main "
        "analysis with alternative definitions of the outcome, with and without outlying "
        "observations, and with a more conservative correction for multiple comparisons. We "
        "also estimated the minimum effect size that the study could detect with 80 per cent "
        "power.",
    ],
    "3 Results": [
        "The final data set met all inclusion criteria after quality control, with less than "
        "3 per cent of records removed. Descriptive statistics are given in Table 1. The main "
        "variables were approximately normally distributed after transformation, and no site "
        "contributed a disproportionate share of the observations.",

        "The central result reported in the abstract was consistent across all sites and years "
        "(Figure 2). Estimates from the sensitivity analyses differed from the main estimate by "
        "less than a fifth of its size, and none of them changed its direction. The effect was "
        "somewhat larger in the subgroups where the theoretical argument predicted it would be "
        "strongest, although the difference between subgroups was not itself significant.",

        "We found no evidence for the alternative explanation discussed in the introduction. "
        "When the relevant covariates were added to the model, the estimate of interest changed "
        "only slightly, and the covariates themselves explained little additional variance. "
        "Model comparison by information criteria favoured the simpler model.",

        "Figure 3 shows how the effect develops over time. It emerges early, stabilises after "
        "the first third of the observation period and shows no sign of decline towards the "
        "end, which argues against a transient response.",
    ],
    "4 Discussion": [
        "Our findings add to a growing body of work on {subject} and clarify an issue that "
        "earlier studies, with their smaller samples, could not resolve. They are consistent "
        "with the mechanism proposed in the introduction and difficult to reconcile with the "
        "main alternative.",

        "The results have practical implications. Decisions that currently rest on the "
        "assumption that the effect is negligible may need to be revisited, and monitoring "
        "programmes could be designed to detect it directly. We caution, however, against "
        "extrapolating the size of the effect beyond the range of conditions that we observed.",

        "Several questions remain open. It is not yet known whether the same pattern holds in "
        "other settings, and the long-term consequences are uncertain. Experimental studies "
        "that manipulate the proposed mechanism directly would provide the strongest test, and "
        "we hope that the data and code released with this paper make such work easier.",
    ],
    "5 Limitations": [
        "This study has limitations. Although our data cover a wider range of conditions than "
        "previous work, they are not a random sample, and the results may not transfer to "
        "settings that differ substantially from ours. Some variables were measured with error, "
        "which would tend to bias estimates towards zero, so the effects we report may be "
        "conservative. Finally, the observational design means that unmeasured confounding "
        "cannot be ruled out entirely.",
    ],
    "Data availability": [
        "The {data} analysed in this study are available in a public repository together with "
        "the code needed to reproduce every table and figure. Raw data that cannot be shared "
        "for legal reasons are available from the corresponding author on reasonable request.",
    ],
    "Acknowledgements": [
        "We thank the technical staff who made the data collection possible, two anonymous "
        "reviewers for comments that improved the manuscript considerably, and colleagues who "
        "commented on an earlier version at a workshop. Any remaining errors are our own.",
    ],
    "Funding": [
        "This work was supported by a national research council grant and by a fellowship to "
        "the first author. The funders had no role in study design, data collection and "
        "analysis, the decision to publish, or the preparation of the manuscript.",
    ],
    "Competing interests": [
        "The authors declare no competing interests.",
    ],
}

# References: composed from these pools, one numbered entry per block, as many as needed.
SURNAMES: list[str] = [
    "Okafor", "Lindqvist", "Chen", "Moreau", "Nakamura", "Garcia", "Kowalski", "Haddad",
    "Petersen", "Singh", "Rossi", "O'Brien", "Ivanova", "Mensah", "Schmidt", "Tanaka",
    "Fernandes", "Novak", "Abdullah", "Walsh", "Kim", "Bianchi", "Andersson", "Oyelaran",
    "Dubois", "Huang", "Martins", "Yilmaz", "Costa", "Fischer", "Nguyen", "Papadopoulos",
]
REFERENCE_TITLES: list[str] = [
    "New perspectives on {subject}",
    "Measuring {subject} at scale: challenges and opportunities",
    "A critical review of {subject} research",
    "Long-term trends in {subject}: evidence from {data}",
    "What drives {subject}? A comparative analysis",
    "Reproducibility of published findings on {subject}",
    "Methods for the analysis of {data}",
    "Bias and uncertainty in {data}",
    "Open data and open code in {field}",
    "Statistical power in {field}: a survey of recent studies",
    "A unified framework for {subject}",
    "{subject} revisited",
    "Sources of variation in {data}",
    "Mechanisms underlying {subject}: a synthesis",
    "Best practices for reporting {data}",
    "Spatial and temporal patterns of {subject}",
    "Modelling {subject} with hierarchical models",
    "Lessons from twenty years of {field} research",
]
JOURNAL_PATTERNS: list[str] = [
    "Journal of {Field} Research", "Advances in {Field}", "{Field} Letters",
    "Annual Review of {Field}", "Methods in {Field}", "International Journal of {Field}",
]
