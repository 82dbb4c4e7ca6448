// pixel-server viewability script (IAB/MRC Viewable Ad Impression rule).
//
// Measures one creative: the element that contains this <script> tag, or the element that
// data-target names by CSS selector. Sends `measurable` once, when it can measure, and
// `viewable` once, when at least 50% of the creative's pixels (30% for creatives of
// 242,500 px^2 or more) have been in the viewport of a visible tab for 1 continuous second;
// data-format="video" selects the video rule, 50% for 2 continuous seconds of play, and a
// video is measurable once its <video> element is found. The clock restarts whenever the
// creative drops under the threshold, is hidden by style (visibility, opacity 0), the tab is
// hidden or the video stops or buffers; a resize is measured anew. A prerendered page measures
// nothing until it is shown. Events go to v.gif beside this script: navigator.sendBeacon
// (POST), else an image request (GET).
//
// ES5 only, and every entry point guarded: it must never throw into the host page, and a
// browser without IntersectionObserver gets nothing sent. The server strips the comment
// lines and indentation before serving it.
(function (w, d) {
  var LARGE_AREA = 242500;
  var THRESHOLDS = [0, 0.3, 0.5, 1];
  // How often, while the creative is in view, what the observer does not see is looked at.
  var RECHECK_MS = 100;
  // A video's readyState once it has data for the frames ahead (HAVE_FUTURE_DATA).
  var CAN_PLAY = 3;

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
    var watch = 0;
    var measurable = 0;
    var done = 0;
    var observer;
    var resizes;

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

    // What the observer sees: enough of the creative's area in the viewport of a visible tab.
    function inView() {
      var threshold = !video && area >= LARGE_AREA ? 0.3 : 0.5;
      // Compare the ratio, not isIntersecting, which ignores the threshold. A zero-area
      // element reports a ratio of 1 while it intersects: it is not a creative in view.
      return area > 0 && ratio >= threshold && !d.hidden;
    }

    // What it does not see: pixels hidden by style (visibility, or an opacity of 0 on the
    // creative or an ancestor) and, for a video, play: not paused, ended or buffering.
    function seen() {
      if (w.getComputedStyle(el).visibility == 'hidden') return false;
      for (var node = el; node && node.nodeType == 1; node = node.parentNode) {
        if (w.getComputedStyle(node).opacity == '0') return false;
      }
      var p = video && player();
      return !video || (!!p && !p.paused && !p.ended && p.readyState >= CAN_PLAY);
    }

    // Measurable once it can measure: at once for a display creative, once its player is
    // found for a video (play cannot be measured without one).
    function measuring() {
      if (!measurable && (!video || player())) {
        measurable = 1;
        send('m');
      }
    }

    function observed(entries) {
      if (!entries.length) return;
      var entry = entries[entries.length - 1];
      var box = entry.boundingClientRect;
      ratio = entry.intersectionRatio;
      area = box.width * box.height;
    }

    // Starts the clock when the rule starts being met, stops it when it stops. While the
    // creative is in view, what the observer does not see is looked at every RECHECK_MS.
    var update = guard(function () {
      if (done) return;
      measuring();
      var looking = inView();
      if (looking && !watch) {
        watch = setInterval(update, RECHECK_MS);
      } else if (!looking && watch) {
        clearInterval(watch);
        watch = 0;
      }
      if (!measurable || !looking || !seen()) {
        clearTimeout(timer);
        timer = 0;
      } else if (!timer) {
        timer = setTimeout(guard(function () {
          timer = 0;
          // A report the observer has queued, not yet delivered, counts too.
          observed(observer.takeRecords());
          if (done || !inView() || !seen()) return update();
          done = 1;
          clearInterval(watch);
          observer.disconnect();
          if (resizes) resizes.disconnect();
          send('v');
        }), video ? 2000 : 1000);
      }
    });

    function start() {
      observer = new IntersectionObserver(guard(function (entries) {
        observed(entries);
        update();
      }), { threshold: THRESHOLDS });
      observer.observe(el);
      // The observer reports a threshold crossed, never a size changed (an empty slot
      // filled, a creative grown past LARGE_AREA): on a resize, a fresh report.
      if (w.ResizeObserver) {
        resizes = new w.ResizeObserver(guard(function () {
          observer.unobserve(el);
          observer.observe(el);
        }));
        resizes.observe(el, { box: 'border-box' });
      }
      measuring();
      d.addEventListener('visibilitychange', update);
      // Media events do not bubble, but a capturing listener on an ancestor sees them.
      var media = ['play', 'playing', 'waiting', 'pause', 'ended'];
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
