// pixel-server viewability script (IAB/MRC Viewable Ad Impression rule).
//
// Measures one creative: the element that contains this <script> tag, or the element that
// data-target names by CSS selector. Sends `measurable` once, when it can measure, and
// `viewable` once, when at least 50% of the creative's pixels (30% for creatives of
// 242,500 px^2 or more) have been in the viewport of a visible tab for 1 continuous second;
// data-format="video" selects the video rule, 50% for 2 continuous seconds of play. The clock
// restarts whenever the creative drops under the threshold, the tab is hidden or the video
// stops. A prerendered page measures nothing until it is shown. Events go to v.gif beside
// this script: navigator.sendBeacon (POST), else an image request (GET).
//
// ES5 only, and every entry point guarded: it must never throw into the host page, and a
// browser without IntersectionObserver gets nothing sent. The server strips the comment
// lines and indentation before serving it.
(function (w, d) {
  var LARGE_AREA = 242500;
  var THRESHOLDS = [0, 0.3, 0.5, 1];

  // Runs f, swallowing any error: the host page must never see one of ours.
  function guard(f) {
    return function (a) {
      try {
        f(a);
      } catch (e) {}
    };
  }

  var measure = guard(function (script) {
    if (!script || !w.IntersectionObserver) return;
    var attr = function (name) {
      return script.getAttribute('data-' + name) || '';
    };
    var selector = attr('target');
    var el = selector ? d.querySelector(selector) : script.parentElement;
    if (!el) {
      // The script may run before the parser reaches its target: one more look once the
      // document is parsed.
      if (selector && d.readyState == 'loading') {
        d.addEventListener('DOMContentLoaded', function () {
          measure(script);
        });
      }
      return;
    }
    var video = attr('format') == 'video';
    var url =
      script.src.replace(/[^\/?#]*([?#].*)?$/, 'v.gif') +
      '?cid=' + encodeURIComponent(attr('cid')) +
      '&crid=' + encodeURIComponent(attr('crid')) +
      '&aff=' + encodeURIComponent(attr('aff')) +
      '&sub=' + encodeURIComponent(attr('sub')) +
      '&cb=' + Math.random().toString(36).slice(2) +
      '&e=';
    var ratio = 0;
    var area = 0;
    var timer = 0;
    var done = 0;
    var observer;

    function send(event) {
      var sent = false;
      try {
        sent = navigator.sendBeacon(url + event);
      } catch (e) {}
      if (!sent) new Image().src = url + event;
    }

    // The video element that plays the creative, if there is one yet.
    function player() {
      return el.tagName == 'VIDEO' ? el : el.querySelector('video');
    }

    function meetsRule() {
      var p = video && player();
      var threshold = !video && area >= LARGE_AREA ? 0.3 : 0.5;
      // Compare the ratio, not isIntersecting, which ignores the threshold. A zero-area
      // element reports a ratio of 1 while it intersects: it is not a creative in view.
      return area > 0 && ratio >= threshold && !d.hidden && !(p && (p.paused || p.ended));
    }

    // Starts the clock when the rule starts being met, stops it when it stops.
    var update = guard(function () {
      if (done) return;
      if (!meetsRule()) {
        clearTimeout(timer);
        timer = 0;
      } else if (!timer) {
        timer = setTimeout(guard(function () {
          timer = 0;
          if (done || !meetsRule()) return update();
          done = 1;
          observer.disconnect();
          send('v');
        }), video ? 2000 : 1000);
      }
    });

    function start() {
      send('m');
      observer = new IntersectionObserver(guard(function (entries) {
        var entry = entries[entries.length - 1];
        var box = entry.boundingClientRect;
        ratio = entry.intersectionRatio;
        area = box.width * box.height;
        update();
      }), { threshold: THRESHOLDS });
      observer.observe(el);
      d.addEventListener('visibilitychange', update);
      // Media events do not bubble, but a capturing listener on an ancestor sees them.
      var media = ['play', 'pause', 'ended'];
      for (var i = 0; i < media.length; i++) el.addEventListener(media[i], update, true);
    }

    if (d.prerendering) {
      d.addEventListener('prerenderingchange', guard(start), { once: true });
    } else {
      start();
    }
  });
  measure(d.currentScript);
})(window, document);
