// MathJax 3 for the pages: configure it for pymdownx.arithmatex (generic mode) and load it.
// The local copy vendored by the build hook (docs/_ext/mathjax_hook.py) is tried first; when the site
// was built without one, the same MathJax version is loaded from a CDN (viewing then needs internet).
(function () {
  var VERSION = "3.2.2";
  var CDN = "https://cdn.jsdelivr.net/npm/mathjax@" + VERSION + "/es5";
  var me = document.currentScript;
  var here = me ? me.src.replace(/mathjax\.js(\?.*)?$/, "") : "javascripts/";
  var LOCAL = here + "vendor/mathjax";

  window.MathJax = {
    tex: {
      inlineMath: [["\\(", "\\)"]],
      displayMath: [["\\[", "\\]"]],
      processEscapes: true,
      processEnvironments: true
    },
    options: {
      // Typeset only what arithmatex marked as math.
      ignoreHtmlClass: ".*|",
      processHtmlClass: "arithmatex"
    },
    loader: { paths: { mathjax: LOCAL } },
    startup: {
      ready: function () {
        MathJax.startup.defaultReady();
        // Material's instant navigation (if enabled) swaps page content: typeset the new page.
        if (typeof document$ !== "undefined") {
          document$.subscribe(function () { MathJax.typesetPromise(); });
        }
      }
    }
  };

  function load(root, onerror) {
    var s = document.createElement("script");
    s.src = root + "/tex-chtml.js";
    s.async = true;
    if (onerror) s.onerror = onerror;
    document.head.appendChild(s);
  }

  load(LOCAL, function () {
    window.MathJax.loader.paths.mathjax = CDN;
    load(CDN, null);
  });
})();
