"""The embedded demo model (:mod:`fdm.demo.model`), `fdm demo` (:mod:`fdm.demo.run`) and ``--model demo``
(:mod:`fdm.demo.family`)."""
