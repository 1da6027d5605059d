// pybind11 binding: chorus.native._hub, the native hub of native/HUB.md.
//
// Python objects never cross into hub.cpp: bytes are copied into std::string while the GIL is
// held, then the GIL is released around the hub's syscalls and per-socket work. The hub is
// single-threaded (the gateway's event-loop thread); releasing the GIL lets other Python
// threads run meanwhile, not call into the same hub.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cerrno>
#include <limits>
#include <string>
#include <system_error>

#include "hub.hpp"

namespace py = pybind11;

namespace {

using chorus::Hub;
using chorus::HubConfig;
using chorus::OutboundEvent;

// A copy of a bytes-like object, made with the GIL held.
std::string copy_bytes(py::handle obj) {
    if (PyBytes_Check(obj.ptr())) return std::string(PyBytes_AS_STRING(obj.ptr()), size_t(PyBytes_GET_SIZE(obj.ptr())));
    Py_buffer view;
    if (PyObject_GetBuffer(obj.ptr(), &view, PyBUF_SIMPLE) != 0) throw py::error_already_set();
    std::string out(static_cast<const char*>(view.buf), size_t(view.len));
    PyBuffer_Release(&view);
    return out;
}

OutboundEvent to_event(py::handle payloads, bool control, int64_t count) {
    if (!PyTuple_Check(payloads.ptr()) || PyTuple_GET_SIZE(payloads.ptr()) != 2)
        throw py::type_error("payloads must be a (json_text, msgpack_binary) tuple");
    OutboundEvent ev;
    for (int i = 0; i < 2; ++i) {
        py::handle item = PyTuple_GET_ITEM(payloads.ptr(), i);
        if (item.is_none()) continue;
        ev.payload[i] = copy_bytes(item);
        ev.present |= uint8_t(1 << i);
    }
    ev.control = control;
    ev.count = uint32_t(std::clamp<int64_t>(count, 0, std::numeric_limits<uint32_t>::max()));
    return ev;
}

void check_covered(const Hub& hub, uint32_t stream, const OutboundEvent& ev) {
    if (!hub.payloads_cover(stream, ev.present))
        throw py::value_error("publish lacks the payload of an encoding a viewer of this stream uses "
                              "(ask variants(stream) first)");
}

void check_close_code(int code) {
    if (!chorus::ws::valid_close_code_to_send(code)) throw py::value_error("close code " + std::to_string(code) + " may not be sent");
}

uint64_t non_negative(int64_t v, const char* name) {
    if (v < 0) throw py::value_error(std::string(name) + " must be >= 0");
    return uint64_t(v);
}

std::unique_ptr<Hub> make_hub(int64_t flush_interval_ms, int64_t flush_max_messages, int64_t backlog_limit_bytes,
                              int64_t slow_close_after_ms, int64_t max_message_bytes, int64_t max_fragments,
                              int64_t heartbeat_interval_ms, int64_t heartbeat_timeout_ms, int deflate_level,
                              int deflate_window_bits, int64_t inflate_limit_bytes, int64_t max_pings_per_s) {
    HubConfig c;
    c.flush_interval_ms = flush_interval_ms;
    c.flush_max_messages = uint32_t(std::min<uint64_t>(non_negative(flush_max_messages, "flush_max_messages"), UINT32_MAX));
    c.backlog_limit_bytes = non_negative(backlog_limit_bytes, "backlog_limit_bytes");
    c.slow_close_after_ms = slow_close_after_ms;
    c.max_message_bytes = non_negative(max_message_bytes, "max_message_bytes");
    c.max_fragments = uint32_t(std::min<uint64_t>(non_negative(max_fragments, "max_fragments"), UINT32_MAX));
    c.heartbeat_interval_ms = heartbeat_interval_ms;
    c.heartbeat_timeout_ms = heartbeat_timeout_ms;
    c.deflate_level = deflate_level;
    c.deflate_window_bits = deflate_window_bits;
    c.inflate_limit_bytes = non_negative(inflate_limit_bytes, "inflate_limit_bytes");
    c.max_pings_per_s = uint32_t(std::min<uint64_t>(non_negative(max_pings_per_s, "max_pings_per_s"), UINT32_MAX));
    return std::make_unique<Hub>(c);
}

py::list drain(Hub& hub) {
    std::vector<chorus::InboundEvent> events = hub.drain();
    py::list out(events.size());
    for (size_t i = 0; i < events.size(); ++i) {
        chorus::InboundEvent& e = events[i];
        out[i] = py::make_tuple(int(e.kind), e.conn, e.stream, py::bytes(e.data), py::bytes(e.tag));
    }
    return out;
}

py::dict stats(const Hub& hub) {
    py::dict out;
    for (const auto& kv : hub.stats()) out[kv.first] = kv.second;
    return out;
}

}  // namespace

PYBIND11_MODULE(_hub, m) {
    m.doc() = "The native hub (native/HUB.md): viewer sockets, coalesced fan-out, frame parsing.";
    m.attr("JSON") = int(chorus::JSON);
    m.attr("MSGPACK") = int(chorus::MSGPACK);
    m.attr("DEFLATE") = int(chorus::DEFLATE);
    m.attr("MESSAGE_TEXT") = int(chorus::MESSAGE_TEXT);
    m.attr("MESSAGE_BINARY") = int(chorus::MESSAGE_BINARY);
    m.attr("CLOSED") = int(chorus::CLOSED);

    // std::system_error (a failed syscall) becomes OSError with its errno.
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const std::system_error& e) {
            py::object err = py::reinterpret_steal<py::object>(
                PyObject_CallFunction(PyExc_OSError, "is", e.code().value(), e.what()));
            PyErr_SetObject(PyExc_OSError, err.ptr());
        }
    });

    py::class_<Hub>(m, "Hub")
        .def(py::init(&make_hub), py::kw_only(), py::arg("flush_interval_ms") = 10, py::arg("flush_max_messages") = 100,
             py::arg("backlog_limit_bytes") = 65536, py::arg("slow_close_after_ms") = 10000,
             py::arg("max_message_bytes") = 65536, py::arg("max_fragments") = 64,
             py::arg("heartbeat_interval_ms") = 60000, py::arg("heartbeat_timeout_ms") = 30000,
             py::arg("deflate_level") = 6, py::arg("deflate_window_bits") = 15, py::arg("inflate_limit_bytes") = 65536,
             py::arg("max_pings_per_s") = 20)
        .def("fileno", &Hub::fileno)
        .def(
            "adopt",
            [](Hub& h, int fd, uint32_t stream, int variant, py::handle leftover, py::handle tag) {
                if (variant < 0 || variant > 0xFF) throw py::value_error("bad variant");
                std::string rest = leftover.is_none() ? std::string() : copy_bytes(leftover);
                std::string who = tag.is_none() ? std::string() : copy_bytes(tag);
                py::gil_scoped_release nogil;
                return h.adopt(fd, stream, uint8_t(variant), std::move(rest), std::move(who));
            },
            py::arg("fd"), py::arg("stream"), py::arg("variant"), py::arg("leftover") = py::bytes(),
            py::arg("tag") = py::bytes())
        .def(
            "publish",
            [](Hub& h, uint32_t stream, py::handle payloads, bool control, int64_t count) {
                OutboundEvent ev = to_event(payloads, control, count);
                check_covered(h, stream, ev);
                py::gil_scoped_release nogil;
                h.publish(stream, std::move(ev));
            },
            py::arg("stream"), py::arg("payloads"), py::arg("control"), py::arg("count"))
        .def(
            "publish_many",
            [](Hub& h, py::iterable items) {
                std::vector<std::pair<uint32_t, OutboundEvent>> batch;
                for (py::handle item : items) {
                    py::tuple t = py::reinterpret_borrow<py::object>(item).cast<py::tuple>();
                    if (t.size() != 4) throw py::type_error("publish_many items are (stream, payloads, control, count)");
                    uint32_t stream = t[0].cast<uint32_t>();
                    batch.emplace_back(stream, to_event(t[1], t[2].cast<bool>(), t[3].cast<int64_t>()));
                    check_covered(h, stream, batch.back().second);
                }
                py::gil_scoped_release nogil;
                for (auto& [stream, ev] : batch) h.publish(stream, std::move(ev));
            },
            py::arg("items"))
        .def("variants", &Hub::variants, py::arg("stream"))
        .def(
            "send",
            [](Hub& h, uint64_t conn, py::handle payload, py::handle binary) {
                std::string data = copy_bytes(payload);
                const int opcode = binary.is_none() ? -1 : PyObject_IsTrue(binary.ptr());
                if (opcode < 0 && !binary.is_none()) throw py::error_already_set();
                py::gil_scoped_release nogil;
                return h.send(conn, data, opcode);
            },
            py::arg("conn"), py::arg("payload"), py::arg("binary") = py::none())
        .def(
            "close",
            [](Hub& h, uint64_t conn, int code, const std::string& reason) {
                check_close_code(code);
                py::gil_scoped_release nogil;
                h.close(conn, code, reason);
            },
            py::arg("conn"), py::arg("code"), py::arg("reason") = "")
        .def("poll", &Hub::poll, py::call_guard<py::gil_scoped_release>())
        .def("next_timeout_ms", [](const Hub&) { return -1; })  // the timerfd wakes the loop
        .def("flush", &Hub::flush_all, py::call_guard<py::gil_scoped_release>())
        .def("drain", &drain)
        .def("viewer_count", &Hub::viewer_count, py::arg("stream"))
        .def("pending", &Hub::pending, py::arg("stream"))
        .def("backlog", &Hub::backlog, py::arg("conn"))
        .def("connections", &Hub::connections)
        .def("stats", &stats)
        .def(
            "close_all",
            [](Hub& h, int code, const std::string& reason) {
                check_close_code(code);
                py::gil_scoped_release nogil;
                h.close_all(code, reason);
            },
            py::arg("code"), py::arg("reason") = "")
        .def("shutdown", &Hub::shutdown, py::call_guard<py::gil_scoped_release>());
}
